// CUDA FFI handlers: the shared handler bodies as grid-stride kernels on
// XLA's stream. No nanobind or Python here (see cuda_module.cc).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "gqsgd/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace gqsgd {
namespace {

template <typename Kernel>
__global__ void GridStride(Kernel kernel, int64_t items) {
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  kernel(first, stride, items);
}

constexpr int kThreadsPerBlock = 256;
// Enough resident blocks to fill any current GPU; the grid-stride loop covers
// the rest, and a clamped grid keeps the block count within launch limits.
constexpr int64_t kMaxBlocks = 4096;

struct CudaExecutor {
  cudaStream_t stream;

  template <typename Kernel>
  ffi::Error Run(const Kernel& kernel, int64_t items) const {
    if (items <= 0) return ffi::Error::Success();
    const int64_t blocks = std::min<int64_t>(
        kMaxBlocks, (items + kThreadsPerBlock - 1) / kThreadsPerBlock);
    GridStride<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(
        kernel, items);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      return ffi::Error::Internal(std::string("gqsgd CUDA launch failed: ") +
                                  cudaGetErrorString(err));
    }
    return ffi::Error::Success();
  }
};

using Stream = ffi::PlatformStream<cudaStream_t>;

ffi::Error QuantizeHandler(cudaStream_t stream, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::U32> seed,
                           ffi::Result<ffi::AnyBuffer> codes, int32_t levels,
                           int32_t bits, bool signed_codes,
                           int32_t scale_shift) {
  return QuantizeImpl(CudaExecutor{stream}, x, scale, seed, codes, levels, bits,
                      signed_codes, scale_shift);
}

ffi::Error DequantizeHandler(cudaStream_t stream, ffi::AnyBuffer codes,
                             ffi::Buffer<ffi::F32> scale,
                             ffi::Result<ffi::Buffer<ffi::F32>> out,
                             int32_t bits, bool signed_codes, int32_t offset,
                             int32_t scale_shift) {
  return DequantizeImpl(CudaExecutor{stream}, codes, scale, out, bits,
                        signed_codes, offset, scale_shift);
}

ffi::Error AverageHandler(cudaStream_t stream, ffi::AnyBuffer a,
                          ffi::AnyBuffer b, ffi::Buffer<ffi::S32> n_a,
                          ffi::Buffer<ffi::S32> n_b, ffi::Buffer<ffi::U32> seed,
                          ffi::Result<ffi::AnyBuffer> out, int32_t bits) {
  // The counts live on the device and reading them would synchronize the
  // stream, so CheckAverageCounts cannot run here: ops.average checks static
  // counts, and global_quantize bounds them by the worker count, which
  // choose_reduction limits to kMaxAverageCount.
  return AverageImpl(CudaExecutor{stream}, a, b, n_a, n_b, seed, out, bits);
}

ffi::Error ExpEncodeHandler(cudaStream_t stream, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::U32> seed,
                            ffi::Result<ffi::Buffer<ffi::U8>> codes,
                            int32_t floor_code, int32_t scale_shift) {
  return ExpEncodeImpl(CudaExecutor{stream}, x, scale, seed, codes, floor_code,
                       scale_shift);
}

ffi::Error ExpDecodeHandler(cudaStream_t stream, ffi::Buffer<ffi::U8> codes,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Result<ffi::Buffer<ffi::F32>> out,
                            int32_t scale_shift) {
  return ExpDecodeImpl(CudaExecutor{stream}, codes, scale, out, scale_shift);
}

ffi::Error ExpReduceHandler(cudaStream_t stream, ffi::Buffer<ffi::U8> a,
                            ffi::Buffer<ffi::U8> b, ffi::Buffer<ffi::U32> seed,
                            ffi::Result<ffi::Buffer<ffi::U8>> out) {
  return ExpReduceImpl(CudaExecutor{stream}, a, b, seed, out);
}

}  // namespace
}  // namespace gqsgd

// Stream work only, no host synchronisation: safe inside CUDA graphs.
#define GQSGD_CUDA_HANDLER(name, impl, bind)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, bind(gqsgd::Stream), \
                                {xla::ffi::Traits::kCmdBufferCompatible})

GQSGD_CUDA_HANDLER(GqsgdQuantizeCuda, gqsgd::QuantizeHandler,
                   GQSGD_BIND_QUANTIZE);
GQSGD_CUDA_HANDLER(GqsgdDequantizeCuda, gqsgd::DequantizeHandler,
                   GQSGD_BIND_DEQUANTIZE);
GQSGD_CUDA_HANDLER(GqsgdAverageCuda, gqsgd::AverageHandler, GQSGD_BIND_AVERAGE);
GQSGD_CUDA_HANDLER(GqsgdExpEncodeCuda, gqsgd::ExpEncodeHandler,
                   GQSGD_BIND_EXP_ENCODE);
GQSGD_CUDA_HANDLER(GqsgdExpDecodeCuda, gqsgd::ExpDecodeHandler,
                   GQSGD_BIND_EXP_DECODE);
GQSGD_CUDA_HANDLER(GqsgdExpReduceCuda, gqsgd::ExpReduceHandler,
                   GQSGD_BIND_EXP_REDUCE);

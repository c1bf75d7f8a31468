// Python module _gqsgd_cuda: the CUDA FFI handlers as capsules. Linked
// against the static CUDA runtime, so it imports on machines without a driver.
#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdQuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdAverageCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpEncodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpDecodeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpReduceCuda);

NB_MODULE(_gqsgd_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["gqsgd_quantize"] =
        nb::capsule(reinterpret_cast<void*>(GqsgdQuantizeCuda));
    d["gqsgd_dequantize"] =
        nb::capsule(reinterpret_cast<void*>(GqsgdDequantizeCuda));
    d["gqsgd_average"] = nb::capsule(reinterpret_cast<void*>(GqsgdAverageCuda));
    d["gqsgd_exp_encode"] =
        nb::capsule(reinterpret_cast<void*>(GqsgdExpEncodeCuda));
    d["gqsgd_exp_decode"] =
        nb::capsule(reinterpret_cast<void*>(GqsgdExpDecodeCuda));
    d["gqsgd_exp_reduce"] =
        nb::capsule(reinterpret_cast<void*>(GqsgdExpReduceCuda));
    return d;
  });
}

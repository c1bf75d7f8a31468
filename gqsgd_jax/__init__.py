"""gqsgd_jax: Global-QSGD and gradient-compression baselines for JAX."""

from gqsgd_jax._src.baselines import psum_mean
from gqsgd_jax._src.baselines import PsumMeanState
from gqsgd_jax._src.collectives import varying
from gqsgd_jax._src.distributed import initialize as initialize_distributed
from gqsgd_jax._src.distributed import launch_local
from gqsgd_jax._src.ffi import HAS_CPU
from gqsgd_jax._src.ffi import HAS_CUDA
from gqsgd_jax._src.global_quantize import global_quantize
from gqsgd_jax._src.global_quantize import GlobalQuantizeState
from gqsgd_jax._src.hadamard import hadamard_transform
from gqsgd_jax._src.hadamard import inverse_randomized_hadamard
from gqsgd_jax._src.hadamard import random_signs
from gqsgd_jax._src.hadamard import randomized_hadamard
from gqsgd_jax._src.hlo import wire_report
from gqsgd_jax._src.worker_state import worker_state_specs
from gqsgd_jax._src.nonfinite import apply_if_finite
from gqsgd_jax._src.nonfinite import ApplyIfFiniteState
from gqsgd_jax._src.hlo import WireReport
from gqsgd_jax._src.ops import average
from gqsgd_jax._src.ops import dequantize
from gqsgd_jax._src.ops import exp_decode
from gqsgd_jax._src.ops import exp_encode
from gqsgd_jax._src.ops import exp_reduce
from gqsgd_jax._src.ops import quantize
from gqsgd_jax._src.ops import seed_from_key
from gqsgd_jax._src.qsgd import qsgd
from gqsgd_jax._src.qsgd import QsgdState
from gqsgd_jax._src.qsgd import wire_bytes as qsgd_wire_bytes
from gqsgd_jax._src.qsgd import WireBytes
from gqsgd_jax._src.thc import thc
from gqsgd_jax._src.thc import ThcState
from gqsgd_jax._src.thc import wire_bytes as thc_wire_bytes

__version__ = "0.1.0"

__all__ = (
    "ApplyIfFiniteState",
    "GlobalQuantizeState",
    "HAS_CPU",
    "HAS_CUDA",
    "PsumMeanState",
    "QsgdState",
    "ThcState",
    "WireBytes",
    "WireReport",
    "apply_if_finite",
    "average",
    "dequantize",
    "exp_decode",
    "exp_encode",
    "exp_reduce",
    "global_quantize",
    "initialize_distributed",
    "launch_local",
    "psum_mean",
    "quantize",
    "seed_from_key",
    "hadamard_transform",
    "inverse_randomized_hadamard",
    "qsgd",
    "qsgd_wire_bytes",
    "random_signs",
    "randomized_hadamard",
    "thc",
    "thc_wire_bytes",
    "varying",
    "wire_report",
    "worker_state_specs",
)

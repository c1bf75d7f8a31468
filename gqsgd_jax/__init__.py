"""gqsgd_jax: Global-QSGD and gradient-compression baselines for JAX."""

from gqsgd_jax._src.ffi import HAS_CPU
from gqsgd_jax._src.ffi import HAS_CUDA
from gqsgd_jax._src.ops import average
from gqsgd_jax._src.ops import dequantize
from gqsgd_jax._src.ops import exp_decode
from gqsgd_jax._src.ops import exp_encode
from gqsgd_jax._src.ops import exp_reduce
from gqsgd_jax._src.ops import quantize
from gqsgd_jax._src.ops import seed_from_key

__version__ = "0.1.0"

__all__ = (
    "HAS_CPU",
    "HAS_CUDA",
    "average",
    "dequantize",
    "exp_decode",
    "exp_encode",
    "exp_reduce",
    "quantize",
    "seed_from_key",
)

"""gqsgd_jax: Global-QSGD and gradient-compression baselines for JAX."""

from gqsgd_jax._src.baselines.acpsgd import acpsgd
from gqsgd_jax._src.baselines.acpsgd import AcpSgdState
from gqsgd_jax._src.baselines.common import WireBytes
from gqsgd_jax._src.baselines.dgc import dgc
from gqsgd_jax._src.baselines.dgc import DGCState
from gqsgd_jax._src.baselines.hadamard import hadamard_transform
from gqsgd_jax._src.baselines.hadamard import inverse_randomized_hadamard
from gqsgd_jax._src.baselines.hadamard import random_signs
from gqsgd_jax._src.baselines.hadamard import randomized_hadamard
from gqsgd_jax._src.baselines.jointsq import jointsq
from gqsgd_jax._src.baselines.jointsq import JointSQState
from gqsgd_jax._src.baselines.lgreco import lgreco
from gqsgd_jax._src.baselines.lgreco import LGrecoState
from gqsgd_jax._src.baselines.powersgd import powersgd
from gqsgd_jax._src.baselines.powersgd import PowerSGDState
from gqsgd_jax._src.baselines.qsgd import qsgd
from gqsgd_jax._src.baselines.qsgd import QsgdState
from gqsgd_jax._src.baselines.qsgd import wire_bytes as qsgd_wire_bytes
from gqsgd_jax._src.baselines.thc import thc
from gqsgd_jax._src.baselines.thc import ThcState
from gqsgd_jax._src.baselines.thc import wire_bytes as thc_wire_bytes
from gqsgd_jax._src.collectives import varying
from gqsgd_jax._src.distributed import initialize as initialize_distributed
from gqsgd_jax._src.distributed import launch_local
from gqsgd_jax._src.ffi import HAS_CPU
from gqsgd_jax._src.ffi import HAS_CUDA
from gqsgd_jax._src.global_quantize import global_quantize
from gqsgd_jax._src.global_quantize import GlobalQuantizeState
from gqsgd_jax._src.global_quantize import OwnerFeedbackState
from gqsgd_jax._src.hierarchical import hierarchical
from gqsgd_jax._src.hierarchical import HierarchicalState
from gqsgd_jax._src.hlo import wire_report
from gqsgd_jax._src.hlo import WireReport
from gqsgd_jax._src.nonfinite import apply_if_finite
from gqsgd_jax._src.nonfinite import ApplyIfFiniteState
from gqsgd_jax._src.ops import average
from gqsgd_jax._src.ops import block_max_abs
from gqsgd_jax._src.ops import dequantize
from gqsgd_jax._src.ops import exp_decode
from gqsgd_jax._src.ops import exp_encode
from gqsgd_jax._src.ops import exp_reduce
from gqsgd_jax._src.ops import quantize
from gqsgd_jax._src.ops import seed_from_key
from gqsgd_jax._src.psum_mean import psum_mean
from gqsgd_jax._src.psum_mean import PsumMeanState
from gqsgd_jax._src.worker_state import worker_state_specs

__version__ = "0.1.0"

__all__ = (
  "AcpSgdState",
  "ApplyIfFiniteState",
  "DGCState",
  "GlobalQuantizeState",
  "HierarchicalState",
  "HAS_CPU",
  "HAS_CUDA",
  "JointSQState",
  "LGrecoState",
  "OwnerFeedbackState",
  "PowerSGDState",
  "PsumMeanState",
  "QsgdState",
  "ThcState",
  "WireBytes",
  "WireReport",
  "acpsgd",
  "apply_if_finite",
  "average",
  "block_max_abs",
  "dequantize",
  "dgc",
  "exp_decode",
  "exp_encode",
  "exp_reduce",
  "global_quantize",
  "hadamard_transform",
  "hierarchical",
  "initialize_distributed",
  "inverse_randomized_hadamard",
  "jointsq",
  "launch_local",
  "lgreco",
  "powersgd",
  "psum_mean",
  "qsgd",
  "qsgd_wire_bytes",
  "quantize",
  "random_signs",
  "randomized_hadamard",
  "seed_from_key",
  "thc",
  "thc_wire_bytes",
  "varying",
  "wire_report",
  "worker_state_specs",
)

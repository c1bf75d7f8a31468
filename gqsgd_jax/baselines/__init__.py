"""The baselines, as their own namespace (like ``optax.contrib``).

The same objects are also exported at the top level (``gqsgd_jax.thc`` is
``gqsgd_jax.baselines.thc``); this namespace keeps them apart from
Global-QSGD's core for users who want to see which is which.
"""

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

__all__ = (
  "AcpSgdState",
  "DGCState",
  "JointSQState",
  "LGrecoState",
  "PowerSGDState",
  "QsgdState",
  "ThcState",
  "WireBytes",
  "acpsgd",
  "dgc",
  "hadamard_transform",
  "inverse_randomized_hadamard",
  "jointsq",
  "lgreco",
  "powersgd",
  "qsgd",
  "qsgd_wire_bytes",
  "random_signs",
  "randomized_hadamard",
  "thc",
  "thc_wire_bytes",
)

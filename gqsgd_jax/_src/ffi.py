"""Imports the compiled FFI modules and registers their handlers with XLA.

This is the only module that touches the extensions. The CPU and CUDA
handlers share each target name, so XLA picks the right one per platform. A
missing module is not an error: the ops fall back to their pure-XLA twins,
and only an explicit ``impl="ffi"`` request fails (see ``ops.py``).
"""

import os
import types

import jax

# The extensions have no stubs (see pyproject.toml): mypy reads them as Any.
try:
  import gqsgd_jax._gqsgd_cpu as _gqsgd_cpu
except ImportError:  # pragma: no cover - depends on the build
  _gqsgd_cpu = None

try:
  import gqsgd_jax._gqsgd_cuda as _gqsgd_cuda
except ImportError:  # pragma: no cover - depends on the build
  _gqsgd_cuda = None

# GQSGD_JAX_DISABLE_FFI=1 behaves as if no module had been built: the
# pure-XLA path only. Useful to compare both paths in one environment.
_DISABLED = os.environ.get("GQSGD_JAX_DISABLE_FFI", "") not in ("", "0")

# Platforms (as jax names them) with registered handlers.
REGISTERED_PLATFORMS: set[str] = set()


def _register(
  module: types.ModuleType | None, platform: str, jax_platform: str
) -> bool:
  if module is None or _DISABLED:
    return False
  for name, capsule in module.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform=platform)
  REGISTERED_PLATFORMS.add(jax_platform)
  return True


HAS_CPU = _register(_gqsgd_cpu, "cpu", "cpu")
HAS_CUDA = _register(_gqsgd_cuda, "CUDA", "cuda")

# The CPU module also exposes a host emulation of the CUDA launch grid.
host_emulation = _gqsgd_cpu

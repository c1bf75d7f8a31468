"""Shared test set-up: 64 simulated CPU devices, the requires_cuda marker.

Most tests use the first 8 devices; the large-W statistics use up to 64.
"""

import os

import jax
import pytest

# Must run before any backend starts. On a GPU host (JAX_PLATFORMS=cuda) this
# only affects the unused CPU client; multi-device tests use the real GPUs.
jax.config.update("jax_num_cpu_devices", 64)

from gqsgd_jax._src import ffi as ffi_lib  # noqa: E402


def has_cuda() -> bool:
  return ffi_lib.HAS_CUDA and jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
  del config
  if has_cuda():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU and the _gqsgd_cuda module")
  for item in items:
    if "requires_cuda" in item.keywords:
      item.add_marker(skip)


def require_devices(n: int) -> list:
  """The first n devices, or a skip (an error if GQSGD_JAX_STRICT_DEVICES)."""
  devices = jax.devices()
  if len(devices) < n:
    msg = f"needs {n} devices, have {len(devices)}"
    if os.environ.get("GQSGD_JAX_STRICT_DEVICES"):
      pytest.fail(msg)
    pytest.skip(msg)
  return devices[:n]

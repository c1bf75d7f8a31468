"""Lowering of the ops for CUDA and CPU, including CUDA on a CPU-only jaxlib."""

import functools
import re

import jax
import numpy as np
import pytest

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import ops

SEED = np.array([1, 2], np.uint32)
X = np.linspace(-1.0, 1.0, 13, dtype=np.float32)
WORDS = np.arange(7, dtype=np.uint8)

# op -> (target name, fn(*args, impl), args). The lowering only needs shapes,
# but concrete arrays keep the signatures honest.
CASES = {
  "quantize": (
    "gqsgd_quantize",
    functools.partial(ops.quantize, levels=7, bits=4),
    (X, np.float32(7.0), SEED),
  ),
  "quantize_int8": (
    "gqsgd_quantize",
    functools.partial(ops.quantize, levels=127, bits=8, signed_codes=True),
    (X, np.float32(127.0), SEED),
  ),
  "dequantize": (
    "gqsgd_dequantize",
    functools.partial(ops.dequantize, n=13, bits=4, offset=7),
    (WORDS, np.float32(0.5)),
  ),
  "average": (
    "gqsgd_average",
    functools.partial(ops.average, bits=4),
    (WORDS, WORDS[::-1].copy(), np.int32(1), np.int32(3), SEED),
  ),
  "exp_encode": (
    "gqsgd_exp_encode",
    ops.exp_encode,
    (X, np.float32(0.25), SEED),
  ),
  "exp_decode": ("gqsgd_exp_decode", ops.exp_decode, (WORDS, np.float32(2.0))),
  "exp_reduce": (
    "gqsgd_exp_reduce",
    ops.exp_reduce,
    (WORDS, WORDS[::-1].copy(), SEED),
  ),
}
OPS = list(CASES)


def _lower(op: str, impl: str, platforms: tuple[str, ...]) -> str:
  _, fn, args = CASES[op]
  f = functools.partial(fn, impl=impl)
  return jax.jit(f).trace(*args).lower(lowering_platforms=platforms).as_text()


requires_cuda_module = pytest.mark.skipif(
  not ffi_lib.HAS_CUDA,
  reason="gqsgd_jax was built without the CUDA module (_gqsgd_cuda), so "
  "impl='auto' lowers to the pure-XLA twin for CUDA",
)
requires_cpu_module = pytest.mark.skipif(
  not ffi_lib.HAS_CPU, reason="gqsgd_jax was built without _gqsgd_cpu"
)


@requires_cuda_module
@pytest.mark.parametrize("op", OPS)
def test_auto_lowers_to_custom_call_for_cuda(op):
  # Works without a GPU: the handler is registered for "CUDA" by name and
  # lowering only emits the custom call; nothing is compiled.
  target = CASES[op][0]
  hlo = _lower(op, "auto", ("cuda",))
  assert "stablehlo.custom_call" in hlo
  assert f"@{target}" in hlo, f"{target} missing from the CUDA lowering"


@requires_cpu_module
@pytest.mark.parametrize("op", OPS)
def test_auto_lowers_to_custom_call_for_cpu(op):
  target = CASES[op][0]
  assert f"@{target}" in _lower(op, "auto", ("cpu",))


@requires_cpu_module
@requires_cuda_module
@pytest.mark.parametrize("op", OPS)
def test_auto_lowers_for_both_platforms(op):
  # One module for a CPU + GPU program (jax merges the identical branches).
  target = CASES[op][0]
  assert f"@{target}" in _lower(op, "auto", ("cpu", "cuda"))


def _op_names(hlo: str) -> list[str]:
  """The StableHLO ops of a module in order (attributes and names dropped)."""
  return re.findall(r"stablehlo\.[a-z_]+", hlo)


@pytest.mark.parametrize("op", OPS)
def test_xla_impl_is_one_portable_program(op):
  # impl="xla" must select the twin whatever the modules and the platform:
  # no custom call (an FFI target, or a jnp function that lowers to a
  # vendor library) and no per-platform branch, so the CPU test suite runs
  # exactly the program a GPU would.
  both = _lower(op, "xla", ("cpu", "cuda"))
  assert "custom_call" not in both and "gqsgd_" not in both
  assert "stablehlo.case" not in both
  cpu = _op_names(_lower(op, "xla", ("cpu",)))
  assert cpu == _op_names(_lower(op, "xla", ("cuda",)))
  assert len(cpu) > 3  # the twin's arithmetic is there, not an empty stub


@pytest.mark.parametrize("op", OPS)
def test_auto_without_modules_lowers_to_twin_for_cuda(op, monkeypatch):
  # A CPU-only wheel on a GPU host: no CUDA handler, so no custom call.
  monkeypatch.setattr(
    ffi_lib, "REGISTERED_PLATFORMS", ffi_lib.REGISTERED_PLATFORMS - {"cuda"}
  )
  hlo = _lower(op, "auto", ("cuda",))
  assert "custom_call" not in hlo


@requires_cuda_module
def test_ffi_impl_accepted_on_a_cuda_host(monkeypatch):
  # What a GPU host reports; the lowering itself is the real CUDA one.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "@gqsgd_quantize" in _lower("quantize", "ffi", ("cuda",))

"""JointSQ's CPU kernels against their XLA twins, bit for bit.

The kernels (xla_ffi/include/gqsgd/jointsq_kernels.h): the exact greedy's
classes (``gqsgd_jointsq_select``), a class-map payload from the classes
(``gqsgd_jointsq_encode_classmap``) and the mean of W gathered class-map
payloads (``gqsgd_jointsq_mean_classmap``).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src.baselines import jointsq as jsq

from _utils import assert_child_pytest_passes

pytestmark = pytest.mark.skipif(
  jax.default_backend() != "cpu" or "cpu" not in ffi_lib.REGISTERED_PLATFORMS,
  reason="the JointSQ kernels have CPU FFI handlers only",
)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8) if x.dtype != np.uint8 else x


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_bits(x), _bits(y))


def _data(kind, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n).astype(np.float32)
  if kind == "sparse":  # zero rows, as an embedding's gradient
    rows = rng.random(-(-n // 8)) < 0.3
    x = x * np.repeat(rows, 8)[:n]
  elif kind == "ties":  # many equal magnitudes: the tie scan
    x = np.round(x * 2).astype(np.float32) / 2
  elif kind == "heavy":  # a heavy tail
    x = (x**3).astype(np.float32)
  elif kind == "tiny":  # near the smallest normal floats
    x = x * np.float32(1e-36)
  elif kind == "zeros":
    x = np.zeros(n, np.float32)
  elif kind == "nonfinite":
    x[n // 3] = np.inf
  return x


KINDS = ["normal", "sparse", "ties", "heavy", "tiny", "zeros"]
# Sizes around the sampled bracket's threshold (2^15), odd and tiny ones.
SIZES = [1, 7, 4099, 40_000]
RATIOS = [0.001, 0.032, 0.2, 1.0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_select_matches_twin(kind, n, ratio):
  layout = jsq.make_layout(n, ratio)
  sq = jax.jit(jsq._squares)(_data(kind, n))
  got, want = (
    jax.jit(
      lambda s, impl=impl: jsq._exact_classes(s, layout.budget_bits, impl)
    )(sq)
    for impl in ("ffi", "xla")
  )
  _assert_same(got, want)
  # And the budget holds (the oracle of jointsq_test checks the greedy).
  weight = np.asarray([0, 2, 4, 8])[np.asarray(got)].sum()
  assert weight <= layout.budget_bits


def test_select_tied_cut_takes_ties_in_item_order():
  # 10 equal squares, budget 7 bits: the cut ties; 3 type-0 items fit
  # (weight 2 each), taken in index order.
  sq = jnp.ones(10, jnp.float32)
  got = jsq._exact_classes(sq, 7, "ffi")
  np.testing.assert_array_equal(got, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  _assert_same(got, jsq._exact_classes(sq, 7, "xla"))


@pytest.mark.parametrize("kind", KINDS + ["nonfinite"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.032, 0.2, 1.0])
def test_encode_matches_twin(kind, n, ratio):
  if os.environ.get(_PORTABLE_CHILD):  # see test_portable_loops_...
    assert not jsq._mean_kernel_is_fast()  # the same probe as encode's
  layout = jsq.make_layout(n, ratio, "classmap")
  v = _data(kind, n, seed=1)
  key = jax.random.key(7)
  got, want = (
    jax.jit(lambda x, impl=impl: jsq.encode(x, layout, key, impl=impl))(v)
    for impl in ("ffi", "xla")
  )
  _assert_same(got, want)


@pytest.mark.parametrize("workers", [1, 3, 8])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.032, 0.2, 1.0])
def test_mean_matches_twin(workers, n, ratio):
  if os.environ.get(_PORTABLE_CHILD):  # see test_portable_loops_...
    assert not jsq._mean_kernel_is_fast()
  layout = jsq.make_layout(n, ratio, "classmap")
  keys = jax.random.split(jax.random.key(3), workers)
  kinds = ["normal", "sparse", "heavy", "ties"]
  payloads = jnp.stack(
    [
      jnp.stack(
        [
          jsq.encode(
            _data(kinds[(w + g) % 4], n, seed=w) * (w + 1), layout, keys[w]
          )[0]
          for g in range(2)
        ]
      )
      for w in range(workers)
    ]
  )  # [W, G, P]
  got, want = (
    jax.jit(lambda c, impl=impl: jsq._mean(c, layout, workers, impl=impl))(
      payloads
    )
    for impl in ("ffi", "xla")
  )
  _assert_same(got, want)
  if workers == 1:  # the mean of one payload is its decode
    _assert_same(got[0], jsq.decode(payloads[0, 0], layout))


# Set in the child process of test_portable_loops_match_twin.
_PORTABLE_CHILD = "GQSGD_JOINTSQ_TEST_PORTABLE"


def test_portable_loops_match_twin():
  """The encode and mean kernels' loops for CPUs without AVX-512, which CI's
  machines never take on their own: their tests again in a child process
  with GQSGD_JAX_CPU_ISA=baseline (read once per process)."""
  tests = (
    "test_mean_matches_twin or test_mean_with_a_nan or test_mean_clips"
    " or test_encode_matches_twin"
  )
  assert_child_pytest_passes(
    __file__, tests, {"GQSGD_JAX_CPU_ISA": "baseline", _PORTABLE_CHILD: "1"}
  )


def test_mean_with_a_nan_payload_is_nan():
  n = 1000
  layout = jsq.make_layout(n, 0.032, "classmap")
  good = jsq.encode(_data("normal", n), layout, jax.random.key(0))[0]
  bad = jsq.encode(_data("nonfinite", n), layout, jax.random.key(1))[0]
  chunk = jnp.stack([good, bad, good])[:, None]
  got = jsq._mean(chunk, layout, 3, impl="ffi")
  assert np.isnan(np.asarray(got)).all()
  assert np.isnan(np.asarray(jsq._mean(chunk, layout, 3, impl="xla"))).all()


def test_mean_clips_inconsistent_counts_like_the_twin():
  # Counts that do not match the class map move the regions: reads clip to
  # the stream, as the twin's gather does.
  n = 4099
  layout = jsq.make_layout(n, 0.2, "classmap")
  p = np.array(jsq.encode(_data("normal", n), layout, jax.random.key(2))[0])
  counts = p[12:24].view(np.int32).copy()
  for bad_counts in ([0, 0, 0], [counts[0] + 1000, -5, counts[2]]):
    q = p.copy()
    q[12:24] = np.asarray(bad_counts, np.int32).view(np.uint8)
    chunk = jnp.asarray(q)[None, None]
    _assert_same(
      jsq._mean(chunk, layout, 1, impl="ffi"),
      jsq._mean(chunk, layout, 1, impl="xla"),
    )


def test_kernels_are_used_on_cpu():
  n = 4099
  layout = jsq.make_layout(n, 0.032, "classmap")
  v = jnp.zeros(n, jnp.float32)
  enc = jax.jit(lambda x: jsq.encode(x, layout, jax.random.key(0)))
  hlo = enc.lower(v).compile().as_text()
  assert "gqsgd_jointsq_select" in hlo
  assert "gqsgd_jointsq_encode_classmap" in hlo
  hlo = _mean_hlo(layout, "auto")
  used = "gqsgd_jointsq_mean_classmap" in hlo
  assert used == jsq._mean_kernel_is_fast()


def _mean_hlo(layout, impl):
  chunk = jnp.zeros((2, 1, layout.payload_bytes), jnp.uint8)
  mean = jax.jit(lambda c: jsq._mean(c, layout, 2, impl=impl))
  return mean.lower(chunk).compile().as_text()


def test_mean_kernel_only_where_vectorized(monkeypatch):
  """Without AVX-512 the kernel's portable loop loses to XLA: "auto" takes
  the twin there, "ffi" still the kernel."""
  layout = jsq.make_layout(4099, 0.032, "classmap")
  monkeypatch.setattr(jsq, "_mean_kernel_is_fast", lambda: False)
  assert "gqsgd_jointsq_mean_classmap" not in _mean_hlo(layout, "auto")
  assert "gqsgd_jointsq_mean_classmap" in _mean_hlo(layout, "ffi")
  monkeypatch.setattr(jsq, "_mean_kernel_is_fast", lambda: True)
  assert "gqsgd_jointsq_mean_classmap" in _mean_hlo(layout, "auto")

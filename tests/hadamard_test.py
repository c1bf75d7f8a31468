"""The blocked Walsh-Hadamard transform of the THC baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from gqsgd_jax._src.baselines import hadamard


def _fwht64(x):
  """Orthonormal Walsh-Hadamard transform of the last axis, float64 numpy
  radix-2 butterflies (the reference)."""
  x = np.array(x, np.float64)
  d = x.shape[-1]
  h = 1
  while h < d:
    y = x.reshape(x.shape[:-1] + (d // (2 * h), 2, h))
    a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
    y[..., 0, :], y[..., 1, :] = a + b, a - b
    x = y.reshape(x.shape)
    h *= 2
  return x / np.sqrt(d)


_fwht = jax.jit(hadamard.hadamard_transform)


@pytest.mark.parametrize("k", list(range(13)))
def test_matches_the_matrix_for_every_pass_layout(k):
  # k <= 6: one product; then 2 or 3 passes of unequal sizes, each group
  # after the first a batch of products from the left.
  d = 2**k
  x = jax.random.normal(jax.random.PRNGKey(k), (2, 3, d))
  y = np.asarray(_fwht(x), np.float64)
  h = scipy.linalg.hadamard(d) / np.sqrt(d)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ h, atol=2e-6)


@pytest.mark.parametrize("k", [19, 22, 23])
def test_large_transforms_and_self_inverse(k):
  x = jax.random.normal(jax.random.PRNGKey(k), (2**k,))
  y = _fwht(x)
  np.testing.assert_allclose(y, _fwht64(x), atol=5e-6)
  np.testing.assert_allclose(_fwht(y), x, atol=5e-6)


def test_batched_rows_are_independent():
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 2**9))
  y = np.asarray(_fwht(x))
  for row in range(5):
    np.testing.assert_allclose(y[row], np.asarray(_fwht(x[row])), atol=1e-6)


@pytest.mark.parametrize("k", [3, 6, 7, 10, 21])
def test_no_overflow_where_the_result_is_finite(k):
  # ||x|| just below float32's max: a transform that sums before scaling
  # overflows on the way, this one only scales down until its last pass.
  d = 2**k
  big = np.finfo(np.float32).max / 2 / np.sqrt(d)
  signs = np.asarray(jax.random.rademacher(jax.random.PRNGKey(k), (d,)))
  x = jnp.asarray(big * signs, jnp.float32)
  y = np.asarray(_fwht(x), np.float64)
  assert np.all(np.isfinite(y))
  ref = _fwht64(np.asarray(x, np.float64))
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_even_sizes_scale_exactly_and_dtypes_are_kept():
  # A constant vector maps onto e_0 * sqrt(d): exact for even k (every
  # scale a power of two).
  for k in (2, 8, 12):
    d = 2**k
    y = np.asarray(_fwht(jnp.full((d,), 3.0)))
    assert y[0] == 3.0 * 2 ** (k / 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2**9,))
  for dtype in (jnp.bfloat16, jnp.float16):
    y = _fwht(x.astype(dtype))
    assert y.dtype == dtype
    np.testing.assert_allclose(
      np.asarray(y, np.float32), _fwht64(x), atol=0.05, rtol=0.02
    )


def test_transform_blocks_and_counter_sign_pieces():
  x = jax.random.normal(jax.random.PRNGKey(1), (2**10,))
  ones = jnp.ones_like(x)
  for block in (None, 4, 7):
    np.testing.assert_allclose(
      hadamard.transform_blocks(x, block),
      hadamard.randomized_hadamard(x, ones, block_log2=block),
      atol=1e-6,
    )
  seed = jnp.asarray([7, 11], jnp.uint32)
  whole = np.asarray(hadamard.counter_signs(seed, 3000))
  assert set(np.unique(whole).tolist()) == {-1.0, 1.0}
  for start, n in ((0, 17), (1000, 2000), (2999, 1)):
    piece = hadamard.counter_signs(seed, n, start=start)
    np.testing.assert_array_equal(piece, whole[start : start + n])


@pytest.mark.parametrize("k", list(range(1, 31)))
def test_pass_groups_cover_every_bit_once(k):
  groups = hadamard._groups(k)
  sizes = [e for _, e in groups]
  assert sum(sizes) == k and max(sizes) <= hadamard.MAX_GROUP_LOG2
  assert len(groups) == -(-k // hadamard.MAX_GROUP_LOG2)
  assert sizes == sorted(sizes, reverse=True)
  assert [lo for lo, _ in groups] == [sum(sizes[:i]) for i in range(len(sizes))]

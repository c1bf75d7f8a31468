"""Tree comparison helpers (optax's test_utils style, without chex)."""

import jax
import numpy as np


def assert_trees_bitwise_equal(a, b) -> None:
  """Same structure, dtypes, shapes and bits (NaN == NaN)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"tree structures differ: {ta} vs {tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, f"leaf {i}: dtype {x.dtype} vs {y.dtype}"
    assert x.shape == y.shape, f"leaf {i}: shape {x.shape} vs {y.shape}"
    xb = x.view(np.uint8) if x.size else x
    yb = y.view(np.uint8) if y.size else y
    if not np.array_equal(xb, yb):
      bad = np.flatnonzero(x.reshape(-1) != y.reshape(-1))[:5]
      raise AssertionError(f"leaf {i}: bits differ at {bad.tolist()}")


def assert_trees_all_close(a, b, rtol=1e-6, atol=0.0) -> None:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"tree structures differ: {ta} vs {tb}"
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)

"""benchmarks/variance_vs_workers.py: its core at small W, its arithmetic."""

import os
import sys

import numpy as np
import pytest

from conftest import require_devices

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import variance_vs_workers as vvw

_DIM = 4096
_KEYS = 64


def _z(errors, expected):
  """z-score of the mean of per-key errors against their expectation."""
  errors = np.asarray(errors)
  return (errors.mean() - expected) / (
    errors.std(ddof=1) / np.sqrt(len(errors))
  )


def _rounded_mean(grads, uniforms):
  """Mean of W stochastically rounded gradients on the 8-bit psum grid
  (global scale); uniforms (K, W, d) drive the rounding."""
  g = np.asarray(grads, np.float64)
  levels = 127 // g.shape[0]
  big_m = np.abs(g).max()
  y = g * levels / big_m
  q = np.floor(y) + (uniforms < y - np.floor(y))
  return q.mean(1) * big_m / levels


def test_relative_errors_by_hand():
  grads = np.array([[1.0, 2.0], [3.0, 2.0]])  # mean (2, 2), ||.||^2 = 8
  est = np.array([[2.0, 2.0], [4.0, 2.0], [2.0, 0.0]])
  np.testing.assert_allclose(vvw.relative_errors(est, grads), [0.0, 0.5, 0.5])


def test_psum_serves_where_the_wire_allows():
  assert vvw.psum_serves(8, 64) and vvw.psum_serves(8, 127)
  assert not vvw.psum_serves(8, 128) and not vvw.psum_serves(8, 256)


@pytest.mark.parametrize("num_workers", [2, 4])
def test_psum_matches_exact_variance(num_workers):
  # The real 8-bit psum with one global scale: over 64 keys the mean
  # relative error is within 5 standard errors of the exact expectation
  # sum f (1 - f) (M/s)^2 / W^2 / ||mean||^2 (independent dithers).
  require_devices(num_workers)
  grads = vvw.gradients(num_workers, _DIM)
  (est,) = vvw.flat_estimates(
    grads, {"g": dict(bits=8, reduction="psum", granularity="global")}, _KEYS
  ).values()
  errors = vvw.relative_errors(est, grads)
  expected = vvw.expected_global_psum(grads)
  assert abs(_z(errors, expected)) < 5, (errors.mean(), expected)


@pytest.mark.parametrize("num_workers", [2, 4])
def test_correlated_dither_is_detected(num_workers):
  # The same check on a numpy model of the psum: independent uniforms per
  # worker pass; one uniform shared by all workers (correlated noise, which
  # does not average out over W) is flagged.
  grads = vvw.gradients(num_workers, _DIM)
  expected = vvw.expected_global_psum(grads)
  rng = np.random.default_rng(7)
  shape = (_KEYS, num_workers, _DIM)
  independent = _rounded_mean(grads, rng.uniform(size=shape))
  assert abs(_z(vvw.relative_errors(independent, grads), expected)) < 5
  shared = np.broadcast_to(rng.uniform(size=(_KEYS, 1, _DIM)), shape)
  correlated = _rounded_mean(grads, shared)
  assert _z(vvw.relative_errors(correlated, grads), expected) > 10


def test_measure_small_w():
  # Every configuration reports at W = 4 (hierarchical needs 2 hosts of 8)
  # and the butterfly's 8-bit error stays below its 4-bit error.
  require_devices(16)
  small = vvw.measure(4, 1024, 2)
  assert set(small) == set(vvw.NAMES)
  assert small[vvw.HIER] is None
  assert all(small[n] is not None for n in vvw.FLAT)
  assert small["8-bit butterfly"] < small["4-bit butterfly"]
  hier = vvw.hierarchical_estimates(vvw.gradients(16, 1024), 2)
  assert hier.shape == (2, 1024)
  assert np.isfinite(np.asarray(hier)).all()

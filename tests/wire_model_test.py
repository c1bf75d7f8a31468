"""benchmarks/wire_model.py: its arithmetic, and against the emulated
cluster's recorded bytes and times."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import wire_model as wm


def test_ring_allreduce_by_hand():
  # W = 16 (2 hosts x 8), 1e9 f32: 2 * 15/16 * 4e9 = 7.5e9 bytes on the
  # host link -> 0.6 s at 100 Gbit/s; NVLink 7.5e9 / 900e9 s; 30 rounds.
  (link,) = wm.method_links("f32", 10**9, 2, 8)
  assert link.inter == pytest.approx(7.5e9)
  assert link.intra == pytest.approx(7.5e9)
  assert link.intra_host == pytest.approx(7 * 7.5e9)
  assert link.rounds_inter == 30
  t = wm.step_time("f32", 10**9, 2, 8)
  assert t == pytest.approx(0.6 + 30 * 5e-6)


def test_butterfly_and_hierarchical_by_hand():
  n, hosts, local = 2**20, 4, 8
  s = n / 2  # 4-bit codes
  w = hosts * local
  (flat,) = wm.method_links("gq4bfly", n, hosts, local)
  # Reduce-scatter: levels 3, 4 cross hosts, s/16 + s/32 per GPU, 8 GPUs.
  assert flat.inter == pytest.approx(8 * (s / 16 + s / 32) + s * (w - 1) / w)
  assert flat.inter == pytest.approx(s * (1 - 1 / hosts) + s * (w - 1) / w)
  assert flat.intra == pytest.approx(s * (1 - 1 / local) + s * (w - 1) / w)
  intra, across, intra2 = wm.method_links("hier_gq4bfly", n, hosts, local)
  assert intra == intra2
  assert intra.intra == pytest.approx(7 / 8 * 4 * n)
  assert intra.inter == 0 and across.intra == 0
  # Each GPU reduces n / 8 over 4 hosts: (3/4 + 3/4) of s / 8, 8 GPUs.
  assert across.inter == pytest.approx(8 * 1.5 * s / 8)
  t = wm.step_time("hier_gq4bfly", n, hosts, local)
  assert t == pytest.approx(
    2 * (intra.intra * 8 / wm.INTRA_BPS + 7 * wm.ALPHA_INTRA)
    + across.inter * 8 / wm.INTER_BPS
    + (2 + 3) * wm.ALPHA_INTER
  )


def test_two_shot_by_hand():
  # W = 32 (4 hosts x 8), 4-bit codes s = n/2 bytes per GPU. All-to-all:
  # each GPU sends s/32 to each of the 24 GPUs on other hosts, so a host's
  # link carries 8 * 24/32 s = 6 s; then the ring all-gather's 31/32 s.
  n, hosts, local = 2**20, 4, 8
  s = n / 2
  (flat,) = wm.method_links("gq4_2shot", n, hosts, local)
  assert flat.inter == pytest.approx(6 * s + 31 / 32 * s)
  assert flat.intra == pytest.approx(7 / 32 * s + 31 / 32 * s)
  assert flat.rounds_inter == 1 + 31
  # L / 2 times the host-link bytes of a ring all-reduce of the codes.
  ring = wm.ring_allreduce(s, hosts, local)
  assert flat.inter / ring.inter == pytest.approx((6 + 31 / 32) / (62 / 32))
  # One GPU per host (the hierarchical inner axis): a ring's bytes.
  (one,) = wm.method_links("gq4_2shot", n, hosts, 1)
  assert one.inter == pytest.approx(2 * 3 / 4 * s)
  _, across, _ = wm.method_links("hier_gq4_2shot", n, hosts, local)
  assert across.inter == pytest.approx(8 * 2 * 3 / 4 * s / 8)


def test_psum_serves_only_the_worker_counts_its_levels_allow():
  assert wm.method_links("gq4psum", 100, 1, 7) is not None  # 15 // 14 = 1
  assert wm.method_links("gq4psum", 100, 1, 8) is None
  assert wm.method_links("gq8psum", 100, 127, 8) is None  # W = 1016 flat
  assert wm.method_links("hier_gq8psum", 100, 127, 8) is not None
  assert wm.method_links("hier_gq8psum", 100, 128, 8) is None


def test_model_matches_the_emulated_cluster():
  if not os.path.exists(wm.CLUSTER_RESULTS):
    pytest.skip("no emulated-cluster results")
  rows = wm.emulated_check(wm.read_cluster_record())
  assert {r["key"] for r in rows} == set(wm.EMULATED)
  for r in rows:
    # Kernel counters add IP/TCP headers (and the scales) to the model's
    # payload: a few percent more, never less.
    assert r["model_inter"] <= r["measured_inter"] <= 1.08 * r["model_inter"], r
    assert r["model_intra"] <= r["measured_intra"] <= 1.08 * r["model_intra"], r
    # The slow link's share of the step follows the bytes (timing noise on
    # a shared machine: a wide band).
    assert 0.8 <= r["measured_wire_s"] / r["model_wire_s"] <= 1.5, r

"""The emulated-cluster benchmark's non-root parts (no namespaces needed).

Command construction and clean-up run against a fake runner; the byte and
time accounting and the results file are checked on a recorded run; the
hand-built bf16 all-reduce runs on simulated devices. The namespace run
itself is opt-in: ``sudo python benchmarks/cluster_benchmark.py --quick``.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import gqsgd_jax

from _utils import data_mesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import cluster
import cluster_benchmark as bench
import cluster_worker

PREFIX = "gqsgd-cl1a2b"


class FakeRunner:
  """Records argv; `ip netns pids` answers from a table, all else succeeds."""

  def __init__(self, pids=None, fail_on=None):
    self.calls = []
    self.pids = pids or {}
    self.fail_on = fail_on

  def __call__(self, argv, check=True):
    argv = list(argv)
    self.calls.append(argv)
    if self.fail_on is not None and argv[: len(self.fail_on)] == self.fail_on:
      if check:
        raise RuntimeError(f"failed: {argv}")
      return subprocess.CompletedProcess(argv, 1, "", "boom")
    out = ""
    if argv[:3] == ["ip", "netns", "pids"]:
      out = "\n".join(map(str, self.pids.get(argv[3], ())))
    return subprocess.CompletedProcess(argv, 0, out, "")


# --------------------------------------------------------------------------
# Commands.


def test_parse_rate_and_label():
  assert cluster.parse_rate("100mbit") == 1e8
  assert cluster.parse_rate("2.5gbit") == 2.5e9
  assert cluster.parse_rate("1e9") == 1e9
  assert cluster.parse_rate("unlimited") is None
  with pytest.raises(ValueError):
    cluster.parse_rate("fast")
  assert cluster.rate_label(1e8) == "100 Mbit/s"
  assert cluster.rate_label(2.5e9) == "2.5 Gbit/s"
  assert cluster.rate_label(None) == "unlimited"


def test_tbf_params_burst_floor_and_scaling():
  slow = cluster.tbf_params(1e8)
  assert slow[:2] == ["rate", "100000000bit"]
  assert slow[slow.index("burst") + 1] == str(64 * 1024)  # floor
  fast = cluster.tbf_params(2.5e9)
  assert fast[fast.index("burst") + 1] == "312500"  # 1 ms at 2.5 Gbit/s
  assert fast[fast.index("latency") + 1] == "50ms"


def test_spec_names_and_addresses():
  spec = cluster.ClusterSpec(4, PREFIX)
  assert spec.namespaces == [f"{PREFIX}-h{i}" for i in range(4)] + [
    f"{PREFIX}-sw"
  ]
  assert spec.address(0) == "10.213.0.1"
  assert spec.coordinator(9000) == "10.213.0.1:9000"
  with pytest.raises(ValueError):
    cluster.ClusterSpec(0, PREFIX)


def test_setup_touches_only_own_namespaces():
  spec = cluster.ClusterSpec(3, PREFIX)
  cmds = cluster.setup_commands(spec)
  added = [c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]]
  assert added == [spec.switch] + [spec.host(i) for i in range(3)]
  for c in cmds:
    if c[:2] == ["ip", "-n"]:
      assert c[2] in spec.namespaces
    if c[:3] == ["ip", "link", "add"] and "veth" in c:
      # Both ends are created inside our namespaces, never in the root one.
      netns = [c[i + 1] for i, a in enumerate(c) if a == "netns"]
      assert len(netns) == 2 and set(netns) <= set(spec.namespaces)
  # Every host's eth0 gets its address and joins the bridge.
  assert [
    "ip",
    "-n",
    spec.host(2),
    "addr",
    "add",
    "10.213.0.3/24",
    "dev",
    "eth0",
  ] in cmds
  assert ["ip", "-n", spec.switch, "link", "set", "p2", "master", "br0"] in cmds


def test_rate_commands_shape_both_directions():
  spec = cluster.ClusterSpec(2, PREFIX)
  set_cmds = cluster.rate_commands(spec, 1e9)
  assert len(set_cmds) == 4 and all(check for _, check in set_cmds)
  targets = {(c[2], c[6]) for c, _ in set_cmds}
  assert targets == {
    (spec.host(0), "eth0"),
    (spec.host(1), "eth0"),
    (spec.switch, "p0"),
    (spec.switch, "p1"),
  }
  assert all(c[3:5] == ["qdisc", "replace"] and "tbf" in c for c, _ in set_cmds)
  off = cluster.rate_commands(spec, None)
  assert all(c[3:5] == ["qdisc", "del"] and not check for c, check in off)


def test_hosts_file_maps_hostname_to_own_address():
  spec = cluster.ClusterSpec(4, PREFIX)
  text = cluster.hosts_file(spec, 2, "vm")
  assert "10.213.0.3 vm" in text.splitlines()
  assert "127.0.0.1 vm" not in text


def test_worker_command_and_environment():
  spec = cluster.ClusterSpec(4, PREFIX)
  c = cluster.Cluster(spec, runner=FakeRunner())
  w = cluster.Workers(c, ["python", "worker.py"], env={"X": "1"})
  argv, env = w.command(3)
  assert argv == ["ip", "netns", "exec", spec.host(3), "python", "worker.py"]
  assert env["GQSGD_COORDINATOR"] == f"10.213.0.1:{cluster.COORDINATOR_PORT}"
  assert env["GQSGD_PROCESS_ID"] == "3"
  assert env["GQSGD_NUM_PROCESSES"] == "4"
  assert env["X"] == "1"


# --------------------------------------------------------------------------
# Clean-up.


def test_cluster_builds_and_tears_down(tmp_path):
  spec = cluster.ClusterSpec(2, PREFIX)
  etc = tmp_path / "netns"
  killed = []
  runner = FakeRunner(pids={spec.host(0): [111, 112], spec.switch: [113]})
  with cluster.Cluster(
    spec,
    runner=runner,
    etc_netns=str(etc),
    hostname="box",
    kill=lambda p, s: killed.append((p, s)),
  ) as c:
    assert (etc / spec.host(1) / "hosts").read_text().count(
      "10.213.0.2 box"
    ) == 1
    c.set_rate(1e9)
  assert sorted(killed) == [
    (111, signal.SIGKILL),
    (112, signal.SIGKILL),
    (113, signal.SIGKILL),
  ]
  deleted = [c[3] for c in runner.calls if c[:3] == ["ip", "netns", "del"]]
  assert sorted(deleted) == sorted(spec.namespaces)
  assert not etc.exists()  # created by us, removed when empty
  assert c.close() == []  # idempotent: nothing run again
  assert len([c for c in runner.calls if c[2] == "del"]) == 3


def test_failed_build_still_tears_down(tmp_path):
  spec = cluster.ClusterSpec(3, PREFIX)
  runner = FakeRunner(fail_on=["ip", "netns", "add", spec.host(1)])
  with (
    pytest.raises(RuntimeError),
    cluster.Cluster(spec, runner=runner, etc_netns=str(tmp_path)),
  ):
    pass  # never reached
  deleted = [c[3] for c in runner.calls if c[:3] == ["ip", "netns", "del"]]
  assert sorted(deleted) == sorted(spec.namespaces)


def test_interrupt_inside_tears_down(tmp_path):
  spec = cluster.ClusterSpec(2, PREFIX)
  runner = FakeRunner()
  with (
    pytest.raises(KeyboardInterrupt),
    cluster.Cluster(spec, runner=runner, etc_netns=str(tmp_path)),
  ):
    raise KeyboardInterrupt
  assert sum(c[:3] == ["ip", "netns", "del"] for c in runner.calls) == 3
  assert not any((tmp_path / ns).exists() for ns in spec.namespaces)


def test_teardown_refuses_foreign_namespaces_and_reports_errors():
  runner = FakeRunner(fail_on=["ip", "netns", "del", f"{PREFIX}-h0"])
  problems = cluster.teardown(
    ["blue", f"{PREFIX}-h0", f"{PREFIX}-sw"],
    runner,
    etc_netns="/nonexistent",
    kill=lambda p, s: None,
  )
  assert any("foreign" in p for p in problems)
  assert any(f"{PREFIX}-h0" in p for p in problems)
  assert not any("blue" in c for c in runner.calls)


def test_own_namespaces_parses_ip_netns_list():
  listing = f"{PREFIX}-h0 (id: 3)\n{PREFIX}-sw\nblue (id: 0)\ngqsgd-clzz-h0\n"
  assert cluster.own_namespaces(listing) == [f"{PREFIX}-h0", f"{PREFIX}-sw"]


def test_without_root_the_benchmark_skips(monkeypatch, capsys):
  monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
  assert "root" in cluster.root_problem()
  assert bench.main(["--quick"]) == 0
  assert "skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------
# Accounting and the results file, from a recorded run.


def _record():
  f32_sent = 6.0 * 2**20  # an f32 all-reduce of 1 Mi elements, W = 4 (x1.5)
  wire = {
    "f32": {
      "sent_bytes": f32_sent,
      "payload_bytes": 4 * 2**20,
      "scale_bytes": 0,
      "float_payload_bytes": 4 * 2**20,
      "by_op": {"all-reduce": 4 * 2**20},
    },
    "bf16": {
      "sent_bytes": f32_sent,
      "payload_bytes": 4 * 2**20,
      "scale_bytes": 0,
      "float_payload_bytes": 4 * 2**20,
      "by_op": {"all-reduce": 4 * 2**20},
    },
    "gq8_psum": {
      "sent_bytes": f32_sent / 4,
      "payload_bytes": 2**20,
      "scale_bytes": 4,
      "float_payload_bytes": 0,
      "by_op": {"all-reduce": 2**20 + 4},
    },
    "local": {
      "sent_bytes": 0.0,
      "payload_bytes": 0,
      "scale_bytes": 0,
      "float_payload_bytes": 0,
      "by_op": {},
    },
  }
  per_rank = {
    0: {
      "f32": [1.0, 1.2, 1.1],
      "bf16": [1.0, 1.0, 1.0],
      "gq8_psum": [0.30, 0.25, 0.26],
      "local": [0.05, 0.05, 0.05],
    },
    1: {
      "f32": [1.1, 1.0, 1.0],
      "bf16": [1.1, 1.0, 1.0],
      "gq8_psum": [0.25, 0.35, 0.25],
      "local": [0.06, 0.04, 0.05],
    },
  }
  unlimited = {
    m: [t / 4 for t in ts] for m, ts in bench.step_times(per_rank).items()
  }
  return {
    "processes": 2,
    "config": dict(bench.QUICK),
    "params": 2**20,
    "methods": ["f32", "bf16", "gq8_psum", "local"],
    "unavailable": {"thc": "ModuleNotFoundError: no"},
    "wire": wire,
    "warmup": 1,
    "compile_seconds": 12.0,
    "runtime_seconds": 90.0,
    "machine": ["- Date: today"],
    "load": {"start": "1", "end": "1"},
    "xla_flags": "",
    "phases": [
      {"rate": 1e9, "steps": 3, "times": bench.step_times(per_rank)},
      {"rate": None, "steps": 3, "times": unlimited},
    ],
  }


def test_step_times_take_the_slowest_rank():
  times = bench.step_times(
    {0: {"a": [1.0, 5.0, 2.0]}, 1: {"a": [2.0, 1.0, 2.5]}}
  )
  assert times == {"a": [2.0, 5.0, 2.5]}


def test_summary_ratios_and_wire_time():
  rows = bench.summarize(_record())
  row = next(r for r in rows if r["key"] == "gq8_psum" and r["rate"] == 1e9)
  # medians over steps of the max over ranks: f32 1.1, gq8 0.30
  assert row["median"] == pytest.approx(0.30)
  assert row["vs_f32"] == pytest.approx(1.1 / 0.30)
  assert row["vs_bf16"] == pytest.approx(1.0 / 0.30)
  assert row["ratio"] == pytest.approx(4.0)
  assert row["efficiency"] == pytest.approx(1.1 / 0.30 / 4)
  assert row["wire_time"] == pytest.approx(1.5 * 2**20 * 8 / 1e9)
  unl = next(r for r in rows if r["key"] == "gq8_psum" and r["rate"] is None)
  assert unl["wire_time"] == 0.0
  assert bench.comm_fraction(_record())[1e9] == pytest.approx(1 - 0.05 / 1.1)


def test_render_tables_targets_and_round_trip(tmp_path):
  record = _record()
  text = bench.render(record)
  assert "| GQ 8-bit psum | 300.0 ms | 3.67× | 3.33× |" in text
  assert "| GQ 8-bit psum | 1.50 MiB | 1.00 MiB |" in text
  assert "THC 4-bit: ModuleNotFoundError" in text
  assert "GQ 8-bit psum vs f32 psum: 3.667× (target ≥ 3.5×): reached" in text
  assert "GQ 4-bit butterfly: not run" in text
  assert "1 Gbit/s 95%" in text  # f32 communication share
  # ideal = 1.1 / (0.05 + (1.1 - 0.05) / 4) = 3.52; 3.667 / 3.52 = 1.04
  assert (
    "- GQ 8-bit psum: 3.67× of ideal 3.52× = 1.04 (reached); faster than f32"
    in text
  )
  md = tmp_path / "cluster.md"
  md.write_text(text)
  assert bench.read_record(str(md)) == json.loads(json.dumps(record))
  png = tmp_path / "speedup.png"
  bench.plot(record, str(png))
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_from_record_regenerates_results(tmp_path, capsys):
  rec = tmp_path / "run.json"
  rec.write_text(json.dumps(_record()))
  out, png = tmp_path / "out.md", tmp_path / "out.png"
  assert (
    bench.main(
      ["--from-record", str(rec), "--output", str(out), "--plot", str(png)]
    )
    == 0
  )
  assert out.read_text().startswith("# Emulated cluster")
  assert png.exists()
  capsys.readouterr()


def test_method_table_keys_are_unique_and_known():
  keys = [m.key for m in cluster_worker.METHODS]
  assert len(keys) == len(set(keys))
  assert {"f32", "bf16", "gq8_psum", "gq4_bfly", "gq_exp"} <= set(keys)
  args = bench.parse_args([])
  assert args.methods[-1] == "local"
  assert args.rates == [1e8, 1e9, 2.5e9, None]
  tx, why = cluster_worker.build_transform(
    cluster_worker.Method("x", "x", "thc", lambda m: m.no_such_factory())
  )
  assert tx is None and "AttributeError" in why
  # Every method of the table builds: a renamed or moved factory must fail
  # here, not silently drop rows from the benchmark.
  for method in cluster_worker.METHODS:
    tx, why = cluster_worker.build_transform(method)
    assert why is None and tx is not None, (method.key, why)


# --------------------------------------------------------------------------
# The hand-built bf16 all-reduce: the mean, at half of f32's wire bytes.


def test_bf16_rsag_mean_and_wire_bytes():
  w = 4
  mesh = data_mesh(w)
  tree = {"a": jnp.zeros((w, 37, 3)), "b": jnp.zeros((w, 5))}
  rng = np.random.default_rng(0)
  grads = jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree
  )

  def reduce_fn(tx):
    return jax.jit(
      jax.shard_map(
        lambda g: tx.update(jax.tree.map(lambda x: x[0], g), None)[0],
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
      )
    )

  rsag = reduce_fn(cluster_worker.bf16_rsag_mean())
  got = rsag(grads)
  want = jax.tree.map(
    lambda x: x.astype(jnp.bfloat16).astype(jnp.float32).mean(0), grads
  )
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-2, atol=2e-2)
  sent = gqsgd_jax.wire_report(rsag.lower(grads).compile()).sent_bytes
  f32 = gqsgd_jax.wire_report(
    reduce_fn(gqsgd_jax.psum_mean()).lower(grads).compile()
  ).sent_bytes
  n = 37 * 3 + 5
  assert sent == pytest.approx(2 * (w - 1) / w * 2 * (-(-n // w) * w))
  assert sent < 0.55 * f32


def test_workers_can_run_niced():
  spec = cluster.ClusterSpec(2, PREFIX)
  c = cluster.Cluster(spec, runner=FakeRunner())
  argv, _ = cluster.Workers(c, ["python", "w.py"], nice=-10).command(0)
  assert argv == [
    "ip",
    "netns",
    "exec",
    spec.host(0),
    "nice",
    "-n",
    "-10",
    "python",
    "w.py",
  ]

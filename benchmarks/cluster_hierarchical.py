"""Emulated 2 hosts x 2 processes: flat vs hierarchical 4-bit at 1 Gbit/s.

    sudo python benchmarks/cluster_hierarchical.py
    python benchmarks/cluster_hierarchical.py --from-record run.json

Topology (benchmarks/cluster.py): one network namespace per "host", two JAX
processes (one CPU device each) per namespace. The processes of a host talk
over the namespace's loopback (unshaped: the fast intra-host link); hosts
talk over their veth links to a bridge, shaped by ``tbf`` on both egresses
(the slow inter-host link) to each of ``--rates`` in turn (default 1 Gbit/s,
100 Mbit/s, then no shaper). Gloo resolves the hostname to the host's own
address, so two processes of one namespace connect to each other through
loopback.

Methods, each ``optax.chain(method, optax.sgd)`` in ``jax.shard_map``:

* f32 psum: ``psum_mean`` over the flat 4-device axis;
* flat 4-bit: ``global_quantize(bits=4)`` over the flat axis ("auto": the
  butterfly at W = 4, as a 4-bit psum would keep 1 level per worker);
* hierarchical 4-bit: ``hierarchical(global_quantize(bits=4, axis_name=
  "host"), local_axis="local")`` on the (host, local) = (2, 2) mesh;
* hierarchical f32: the same with ``psum_mean`` across hosts (what the
  topology alone buys).

Step time: each step behind a barrier, a step's time is its slowest
process's; medians, methods round-robin. Bytes per link: the kernel's
interface counters (``tx_bytes`` of each host's eth0 = inter-host, of its
lo = intra-host; IP/TCP headers included) around steps of one method alone,
and the bytes the compiled HLO sends per collective, classified by its
replica groups as intra-host (all members on one host) or spanning hosts.

Writes benchmarks/results/hierarchical_cluster.md and
hierarchical_cluster.png. Needs root; without it, prints why and exits 0.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
HOSTS, PER_HOST = 2, 2
XLA_FLAGS = (
  "--xla_cpu_use_fusion_emitters=false --xla_cpu_experimental_ynn_fusion_type="
)
METHODS = {  # key: (label, mesh: "flat" or "2d")
  "f32": ("f32 psum (flat)", "flat"),
  "gq4": ("GQ 4-bit flat (butterfly, W=4)", "flat"),
  "hier_gq4": ("hierarchical 4-bit (GQ auto over 2 hosts)", "2d"),
  "hier_f32": ("hierarchical f32 (psum over 2 hosts)", "2d"),
  "local": ("compute only (no communication)", "flat"),
}
MODEL = {
  "d_in": 1024,
  "hidden": [2048, 1024],
  "classes": 16,
  "batch": 8,
  "lr": 0.01,
}


# --------------------------------------------------------------------------
# Replica groups -> which links a collective uses (pure, tested).

_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_IOTA = re.compile(
  r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\([\d,]+\))?"
)
_PAIRS = re.compile(r"source_target_pairs=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def replica_groups(line: str, num_devices: int):
  """The device groups of an HLO collective line (list of lists) or None."""
  m = _LIST.search(line)
  if m:
    return [
      [int(d) for d in g.split(",") if d]
      for g in re.findall(r"\{([\d,]*)\}", m.group(1))
    ]
  m = _IOTA.search(line)
  if m:
    import numpy as np  # pylint: disable=g-import-not-at-top

    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(4):
      perm = [int(d) for d in m.group(4)[2:-1].split(",")]
      ids = ids.transpose(perm)
    return ids.reshape(groups, size).tolist()
  m = _PAIRS.search(line)
  if m:
    return [
      [int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))
    ]
  if "replica_groups={}" in line:
    return [list(range(num_devices))]
  return None


def link_class(groups, per_host: int) -> str:
  """ "intra" if every group stays on one host, else "inter"."""
  if groups is None:
    return "unknown"
  same = all(len({d // per_host for d in g}) == 1 for g in groups)
  return "intra" if same else "inter"


def hlo_bytes_by_link(text: str, num_devices: int, per_host: int) -> dict:
  """Sent bytes per device by link class, from a compiled step's HLO."""
  from gqsgd_jax._src import hlo  # pylint: disable=g-import-not-at-top

  out = {"intra": 0.0, "inter": 0.0, "unknown": 0.0}
  for line in text.splitlines():
    found = hlo.collectives(line)
    if not found:
      continue
    groups = replica_groups(line, num_devices)
    kind = link_class(groups, per_host)
    size = len(groups[0]) if groups else num_devices
    for c in found:
      out[kind] += c.sent_bytes(size)
  return out


# --------------------------------------------------------------------------
# The worker: one process of the emulated cluster.


def emit(tag, **payload):
  sys.stdout.write(
    cluster.LINE_TAG + json.dumps({"tag": tag, **payload}) + "\n"
  )
  sys.stdout.flush()


def worker(config: dict):
  import gqsgd_jax  # pylint: disable=g-import-not-at-top

  gqsgd_jax.initialize_distributed()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  rank = jax.process_index()
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  auto = jax.sharding.AxisType.Auto
  meshes = {
    "flat": (
      jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(auto,)),
      "data",
    ),
    "2d": (
      jax.sharding.Mesh(
        np.array(devices).reshape(HOSTS, -1),
        ("host", "local"),
        axis_types=(auto,) * 2,
      ),
      ("host", "local"),
    ),
  }
  dims = [config["d_in"]] + config["hidden"] + [config["classes"]]
  sizes = list(zip(dims[:-1], dims[1:]))

  def init_params(key):
    params = {}
    for i, (a, b) in enumerate(sizes):
      key, sub = jax.random.split(key)
      params[f"w{i}"] = jax.random.normal(sub, (a, b)) * (2.0 / a) ** 0.5
      params[f"b{i}"] = jnp.zeros((b,))
    return params

  def loss_fn(params, batch):
    x, y = batch
    for i in range(len(sizes)):
      x = x @ params[f"w{i}"] + params[f"b{i}"]
      if i < len(sizes) - 1:
        x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

  rng = np.random.default_rng(1000 + rank)
  x = rng.standard_normal((1, config["batch"], config["d_in"]), np.float32)
  y = rng.integers(0, config["classes"], (1, config["batch"]), np.int32)

  def build(key):
    if key == "f32":
      return gqsgd_jax.psum_mean(axis_name="data")
    if key == "gq4":
      return gqsgd_jax.global_quantize(bits=4, axis_name="data")
    inner = (
      gqsgd_jax.global_quantize(bits=4, axis_name="host")
      if key == "hier_gq4"
      else gqsgd_jax.psum_mean(axis_name="host")
    )
    return gqsgd_jax.hierarchical(inner, local_axis="local")

  lr = config["lr"]
  thunks, hlo_bytes, sent, errors = {}, {}, {}, {}
  first = lambda t: jax.tree.map(lambda a: a[0], t)

  def relative_error(tx, mesh, axes, params, batch, samples=4):
    """||estimate - mean||^2 / ||mean||^2 of the step's gradient, per
    sample (successive dither keys)."""

    def err(p, s, b):
      g = jax.grad(loss_fn)(gqsgd_jax.varying(p, axes), first(b))
      est, s = tx.update(g, s, p)
      exact = jax.tree.map(lambda x: jax.lax.pmean(x, axes), g)
      sq = lambda t: sum(
        jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(t)
      )
      return sq(jax.tree.map(jnp.subtract, est, exact)) / sq(exact), s

    fn = jax.jit(
      jax.shard_map(
        err, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=(P(), P())
      )
    )
    state = jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params)
    out = []
    for _ in range(samples):
      e, state = fn(params, state, batch)
      out.append(float(np.asarray(e.addressable_shards[0].data)))
    return out

  for key in config["methods"]:
    mesh, axes = meshes[METHODS[key][1]]
    sharded = NamedSharding(mesh, P(axes))
    replicated = NamedSharding(mesh, P())
    batch = (
      jax.make_array_from_process_local_data(sharded, x),
      jax.make_array_from_process_local_data(sharded, y),
    )
    params = jax.jit(init_params, out_shardings=replicated)(
      jax.random.PRNGKey(0)
    )
    if key == "local":

      def local_step(p, b, axes=axes):
        g = jax.grad(loss_fn)(gqsgd_jax.varying(p, axes), first(b))
        return jax.tree.map(lambda a, d: (a - lr * d)[None], p, g)

      fn = jax.jit(
        jax.shard_map(
          local_step, mesh=mesh, in_specs=(P(), P(axes)), out_specs=P(axes)
        )
      )
      compiled = fn.lower(params, batch).compile()
      thunks[key] = lambda c=compiled, p=params, b=batch: c(p, b)
    else:
      tx = optax.chain(build(key), optax.sgd(lr))

      def step(p, s, b, tx=tx, axes=axes):
        g = jax.grad(loss_fn)(gqsgd_jax.varying(p, axes), first(b))
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      fn = jax.jit(
        jax.shard_map(
          step, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=(P(), P())
        ),
        donate_argnums=(0, 1),
      )
      state = jax.jit(tx.init, out_shardings=replicated)(params)
      compiled = fn.lower(params, state, batch).compile()
      holder = {"p": params, "s": state}

      def thunk(c=compiled, h=holder, b=batch):
        h["p"], h["s"] = c(h["p"], h["s"], b)
        return h["p"]

      thunks[key] = thunk
    if key in ("gq4", "hier_gq4"):
      errors[key] = relative_error(build(key), mesh, axes, params, batch)
    text = compiled.as_text()
    hlo_bytes[key] = hlo_bytes_by_link(text, len(devices), PER_HOST)
    sent[key] = gqsgd_jax.wire_report(text).sent_bytes
    jax.block_until_ready(thunks[key]())
    print(f"compiled {key}", flush=True)

  mesh, _ = meshes["flat"]
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("data")), np.ones((1,), np.float32)
  )
  barrier = jax.jit(
    jax.shard_map(
      lambda v: jax.lax.psum(v, "data"),
      mesh=mesh,
      in_specs=P("data"),
      out_specs=P(),
    )
  )
  jax.block_until_ready(barrier(ones))
  emit(
    "ready",
    rank=rank,
    hlo_bytes=hlo_bytes,
    sent=sent,
    errors=errors,
    params=sum(a * b + b for a, b in sizes),
    jax_version=jax.__version__,
  )
  for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "quit":
      break
    keys = command.get("methods") or list(thunks)
    times = {k: [] for k in keys}
    for i in range(command["warmup"] + command["repeats"]):
      for k in keys:
        jax.block_until_ready(barrier(ones))
        start = time.perf_counter()
        jax.block_until_ready(thunks[k]())
        if i >= command["warmup"]:
          times[k].append(time.perf_counter() - start)
    jax.block_until_ready(barrier(ones))
    emit("times", rank=rank, times=times)


# --------------------------------------------------------------------------
# The driver (root).


class HostWorkers(cluster.Workers):
  """``per_host`` processes in each host namespace (ranks host-major)."""

  def __init__(self, c, argv, *, per_host, **kwargs):
    super().__init__(c, argv, **kwargs)
    self.per_host = per_host

  def command(self, rank):
    argv, env = super().command(rank // self.per_host)
    env.update(
      {
        "GQSGD_NUM_PROCESSES": str(self.cluster.spec.num_hosts * self.per_host),
        "GQSGD_PROCESS_ID": str(rank),
      }
    )
    return argv, env

  def start(self):
    for rank in range(self.cluster.spec.num_hosts * self.per_host):
      argv, env = self.command(rank)
      proc = self.popen(
        argv,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
      self.procs.append(proc)
      self.tails[rank] = []
      threading.Thread(
        target=self._pump, args=(rank, proc.stdout), daemon=True
      ).start()


def link_counters(spec) -> dict:
  """{"inter": eth0 tx bytes summed over hosts, "intra": lo tx bytes}."""
  out = {"inter": 0, "intra": 0}
  for i in range(spec.num_hosts):
    for dev, kind in (("eth0", "inter"), ("lo", "intra")):
      text = cluster.run_command(
        ["ip", "-n", spec.host(i), "-s", "-j", "link", "show", "dev", dev]
      ).stdout
      out[kind] += json.loads(text)[0]["stats64"]["tx"]["bytes"]
  return out


def run(args) -> dict:
  config = dict(MODEL, methods=args.methods)
  spec = cluster.ClusterSpec(HOSTS, cluster.unique_prefix())
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    json.dumps(config),
  ]
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS}
  load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
  start = time.monotonic()
  log = sys.stderr
  with cluster.Cluster(spec, log=log) as c:
    workers = HostWorkers(
      c, argv, per_host=PER_HOST, env=env, log=log, nice=args.nice
    )
    try:
      c.set_rate(args.rates[0])
      workers.start()
      info = workers.expect("ready", timeout=600)[0]
      log.write(f"[bench] compiled after {time.monotonic() - start:.0f} s\n")
      times = {}
      for rate in args.rates:
        c.set_rate(rate)
        workers.send({"op": "run", "warmup": 1, "repeats": args.repeats})
        got = workers.expect("times", timeout=600)
        label = cluster.rate_label(rate)
        times[label] = {
          k: [
            max(got[r]["times"][k][i] for r in got) for i in range(args.repeats)
          ]
          for k in args.methods
        }
        log.write(
          f"[bench] {label}: "
          + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.0f} ms"
            for k, v in times[label].items()
          )
          + "\n"
        )
      link = {}
      for k in args.methods:
        before = link_counters(spec)
        workers.send(
          {"op": "run", "methods": [k], "warmup": 0, "repeats": args.byte_steps}
        )
        workers.expect("times", timeout=300)
        after = link_counters(spec)
        # Per step and per host (each host has one uplink).
        link[k] = {
          kind: (after[kind] - before[kind]) / (args.byte_steps * HOSTS)
          for kind in before
        }
      workers.send({"op": "quit"})
    finally:
      workers.stop()
  return {
    "times": times,
    "link": link,
    "hlo_bytes": info["hlo_bytes"],
    "sent": info["sent"],
    "params": info["params"],
    "errors": info.get("errors", {}),
    "methods": args.methods,
    "repeats": args.repeats,
    "byte_steps": args.byte_steps,
    "config": config,
    "jax": info["jax_version"],
    "load": {
      "start": load_start,
      "end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    },
    "runtime_seconds": time.monotonic() - start,
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "cpu": _cpu(),
    "cores": os.cpu_count(),
    "commit": _commit(),
  }


def _commit() -> str:
  """HEAD, and whether the working tree had changes (shared checkouts)."""
  git = lambda *a: subprocess.run(
    ["git", "-C", HERE, *a], text=True, capture_output=True
  ).stdout.strip()
  head = git("rev-parse", "--short", "HEAD") or "unknown"
  return head + (
    " + uncommitted changes"
    if git("status", "--porcelain", "--untracked-files=no")
    else ""
  )


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def _mib(b: float) -> str:
  return f"{b / 2**20:.2f} MiB"


def render(record: dict) -> str:
  rates = list(record["times"])
  lines = [
    "# Emulated 2 hosts × 2 processes: hierarchical vs flat 4-bit",
    "",
    f"- Date: {record['date']}",
    f"- Machine: {record['cpu']}, {record['cores']} logical cores shared "
    "by all 4 processes and by other jobs",
    f"- Load average (1, 5, 15 min) at start {record['load']['start']}, "
    f"at end {record['load']['end']}",
    f"- Code: {record.get('commit', 'unknown')}; jax {record['jax']}; "
    f"runtime {record['runtime_seconds']:.0f} s; "
    "command: `python benchmarks/cluster_hierarchical.py`",
    f"- Model: MLP {record['config']['d_in']}-"
    + "-".join(map(str, record["config"]["hidden"]))
    + f"-{record['config']['classes']} ({record['params']:,} f32 "
    f"parameters, {_mib(4 * record['params'])} of gradient), "
    f"{record['config']['batch']} examples per process",
    "- Links: inter-host veth + bridge, tbf at each rate below on both "
    "egresses (changed under the running processes); "
    "intra-host: loopback of the host's namespace (unshaped)",
    f"- Timing: median of {record['repeats']} steps after 1 warm-up, "
    "methods round-robin, each step behind a barrier, slowest process",
    f"- Link bytes: interface tx counters over {record['byte_steps']} "
    "steps of each method alone, per step and per host (IP/TCP headers "
    "included)",
    "",
    "## Median step time (speedup vs f32 psum)",
    "",
    "| method | " + " | ".join(rates) + " |",
    "|---|" + "---:|" * len(rates),
  ]
  for k in record["methods"]:
    cells = []
    for rate in rates:
      med = {m: statistics.median(v) for m, v in record["times"][rate].items()}
      vs = "" if k == "local" else f" ({med['f32'] / med[k]:.2f}×)"
      cells.append(f"{med[k] * 1e3:.0f} ms{vs}")
    lines.append(f"| {METHODS[k][0]} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "## Bytes per step",
    "",
    "Measured: bytes a host transmits per step on its inter-host link "
    "(eth0) and inside the host (lo, both processes together). HLO: what "
    "one device sends with bandwidth-optimal collectives, by the replica "
    "groups of each collective (intra: the group stays on one host; "
    "spanning: it crosses hosts — a flat collective over all 4 devices "
    "is counted whole here, though a ring sends only part of it across).",
    "",
    "| method | measured inter-host / host | measured intra-host / host "
    "| HLO spanning / device | HLO intra / device |",
    "|---|---:|---:|---:|---:|",
  ]
  for k in record["methods"]:
    if k == "local":
      continue
    m, h = record["link"][k], record["hlo_bytes"][k]
    lines.append(
      f"| {METHODS[k][0]} | {_mib(m['inter'])} | "
      f"{_mib(m['intra'])} | {_mib(h['inter'])} | "
      f"{_mib(h['intra'])} |"
    )
  if record.get("errors"):
    lines += [
      "",
      "## Quantization error of the mean gradient",
      "",
      "Relative squared error ||ĝ − ḡ||² / ||ḡ||² of the "
      "first step's gradient (same parameters and batches), over "
      "successive dither keys:",
      "",
      "| method | mean | samples |",
      "|---|---:|---|",
    ]
    for k, v in record["errors"].items():
      lines.append(
        f"| {METHODS[k][0]} | {statistics.mean(v):.4f} | "
        + ", ".join(f"{e:.4f}" for e in v)
        + " |"
      )
  lines += (
    [
      "",
      "![step time and inter-host bytes](hierarchical_cluster.png)",
      "",
      "## Notes",
      "",
    ]
    + record.get("notes", [])
    + [
      "",
      "<details><summary>raw record</summary>",
      "",
      "```json",
      json.dumps(record, indent=1),
      "```",
      "",
      "</details>",
      "",
    ]
  )
  return "\n".join(lines)


def plot(record: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = [k for k in record["methods"] if k != "local"]
  labels = [METHODS[k][0].replace(" (", "\n(") for k in keys]
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  x = range(len(keys))
  rates = list(record["times"])
  width = 0.8 / len(rates)
  for j, rate in enumerate(rates):
    med = [statistics.median(record["times"][rate][k]) * 1e3 for k in keys]
    a.bar(
      [i - 0.4 + width * (j + 0.5) for i in x],
      med,
      width,
      label=f"{rate} between hosts",
    )
  if "local" in record["methods"]:
    a.axhline(
      statistics.median(record["times"][rates[0]]["local"]) * 1e3,
      color="gray",
      ls="--",
      label="compute only",
    )
  a.set_xticks(list(x), labels)
  a.set_yscale("log")
  a.set_ylabel("median step (ms)")
  a.set_title("step time")
  a.legend(fontsize=7)
  inter = [record["link"][k]["inter"] / 2**20 for k in keys]
  intra = [record["link"][k]["intra"] / 2**20 for k in keys]
  b.bar([i - 0.2 for i in x], inter, 0.4, label="inter-host (eth0)")
  b.bar([i + 0.2 for i in x], intra, 0.4, label="intra-host (lo)")
  b.set_xticks(list(x), labels)
  b.set_ylabel("MiB per step per host (measured)")
  b.set_title("bytes per link")
  b.legend()
  for ax in (a, b):
    ax.tick_params(axis="x", labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--rates", default="1gbit,100mbit,unlimited")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--byte-steps", type=int, default=2)
  parser.add_argument("--nice", type=int, default=-10)
  parser.add_argument("--timeout", type=float, default=900)
  parser.add_argument("--record", default=None)
  parser.add_argument("--from-record", default=None)
  parser.add_argument(
    "--output", default=os.path.join(RESULTS, "hierarchical_cluster.md")
  )
  parser.add_argument(
    "--plot", default=os.path.join(RESULTS, "hierarchical_cluster.png")
  )
  args = parser.parse_args(argv)
  if args.worker:
    try:
      worker(json.loads(args.worker))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      emit("error", message=f"{type(e).__name__}: {e}")
      sys.exit(1)
    return 0
  args.methods = args.methods.split(",")
  if args.from_record:
    with open(args.from_record) as f:
      record = json.load(f)
  else:
    problem = cluster.root_problem()
    if problem:
      print(f"skipped: {problem}")
      return 0
    args.rates = [cluster.parse_rate(r) for r in args.rates.split(",")]
    cluster.install_signal_handlers(args.timeout)
    record = run(args)
    if args.record:
      with open(args.record, "w") as f:
        json.dump(record, f, indent=1)
  with open(args.output, "w") as f:
    f.write(render(record))
  plot(record, args.plot)
  print(render(record).split("<details>")[0])
  return 0


if __name__ == "__main__":
  sys.exit(main())

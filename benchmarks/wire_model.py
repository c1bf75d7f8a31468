"""A model of wire time per step: flat vs hierarchical reductions at scale.

    python benchmarks/wire_model.py            # writes results/wire_model.md

W = H x L GPUs: H hosts of L GPUs; each host has one inter-host link of
``inter_bps`` (default 100 Gbit/s, full duplex), each GPU an intra-host link
of ``intra_Bps`` (default 900 GB/s, NVLink). The gradient has N elements;
a method puts ``e`` bytes per element on the wire (f32 4, bf16 2, b-bit
codes b/8). Ranks are host-major (GPU l of host h is rank h L + l), as
launchers number them. Collectives are bandwidth-optimal:

* ring all-reduce over W (f32 psum, integer psum of codes): every chunk
  passes every edge of the ring, in the reduce-scatter and again in the
  all-gather, and the ring crosses each host boundary once: a host's link
  sends 2 (W-1)/W e N, and each intra-host edge as much.
* ring all-gather over W: (W-1)/W e N per edge (host link and intra edge).
* butterfly reduce-scatter (recursive halving): level k sends
  e N / 2^(k+1) to the partner at distance 2^k; levels k < log2 L stay in
  the host. Per host, the inter-host levels send L e N (1/L - 1/W) =
  e N (1 - 1/H); the intra-host levels e N (L - 1) (over L GPU links).
* two-shot (Global-QSGD's default): one all-to-all of b-bit codes, each
  worker sending e N / W to every other worker, then a ring all-gather of
  the owners' g-bit results. The all-to-all cannot aggregate on the way:
  of a GPU's (W-1)/W e N, (W-L)/W e N leaves its host, so a host's link
  sends L e N (1 - 1/H), about L/2 times a ring's 2 e N.
* hierarchical: reduce-scatter then all-gather over L in f32 ((L-1)/L x
  4N per GPU each) on NVLink, and the inner reduction over H hosts on
  each GPU's N/L block; the L GPUs of a host share its link, so a host
  sends L times one GPU's inner bytes.

Time per step = bytes / bandwidth on the busiest link of each phase plus
alpha per sequential message round (``alpha_inter``, ``alpha_intra``);
phases that follow each other (hierarchical: intra, inter, intra) add,
the links of one flat collective overlap (the slowest link sets the pace).
A method whose wire format cannot serve W (psum with fewer than one level
per worker) is reported as n/a.

The bytes per link are checked against the emulated 2 x 2 cluster
(benchmarks/cluster_hierarchical.py) in tests/hierarchical_test.py.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
INTER_BPS = 100e9  # bits/s per host
INTRA_BPS = 900e9 * 8  # bits/s per GPU (900 GB/s)
ALPHA_INTER = 5e-6  # s per message round across hosts
ALPHA_INTRA = 1e-6  # s per message round inside a host


@dataclasses.dataclass(frozen=True)
class Link:
  """Bytes per step: on each host's inter-host link, on the busiest
  intra-host GPU link, and on all intra-host links of a host together;
  message rounds across hosts and inside hosts."""

  inter: float
  intra: float
  rounds_inter: int = 0
  rounds_intra: int = 0
  intra_host: float = 0.0


def psum_levels(bits: int, workers: int) -> int:
  """Levels per worker of the integer psum (8-bit int8, sub-byte lanes)."""
  return 127 // workers if bits == 8 else (2**bits - 1) // (2 * workers)


def ring_allreduce(nbytes: float, hosts: int, local: int) -> Link:
  w = hosts * local
  share = 2 * (w - 1) / w * nbytes
  return Link(
    share if hosts > 1 else 0.0,
    share if local > 1 else 0.0,
    2 * (w - 1) if hosts > 1 else 0,
    2 * (w - 1) if hosts == 1 else 0,
    (local - 1) * share,
  )


def ring_allgather(nbytes: float, hosts: int, local: int) -> Link:
  w = hosts * local
  share = (w - 1) / w * nbytes
  return Link(
    share if hosts > 1 else 0.0,
    share if local > 1 else 0.0,
    w - 1 if hosts > 1 else 0,
    w - 1 if hosts == 1 else 0,
    (local - 1) * share,
  )


def butterfly(nbytes: float, hosts: int, local: int) -> Link:
  """Recursive-halving reduce-scatter + ring all-gather (powers of two)."""
  inter = nbytes * (1 - 1 / hosts)  # per host
  # Per GPU link: the intra levels send nbytes (1 - 1/L) in all.
  intra = nbytes * (1 - 1 / local)
  gather = ring_allgather(nbytes, hosts, local)
  return Link(
    inter + gather.inter,
    intra + gather.intra,
    int(math.log2(hosts)) + gather.rounds_inter,
    int(math.log2(local)) + gather.rounds_intra,
    local * intra + gather.intra_host,
  )


def two_shot(
  nbytes: float, gather_nbytes: float, hosts: int, local: int
) -> Link:
  """All-to-all of the codes (nbytes per worker) + ring all-gather of the
  owners' results (gather_nbytes in all); host-major ranks."""
  w = hosts * local
  # Per GPU: nbytes / w to each of the (w - local) GPUs of other hosts and
  # to the (local - 1) of its own host; the messages go out together.
  inter = local * nbytes * (w - local) / w  # per host
  intra = nbytes * (local - 1) / w  # per GPU link
  gather = ring_allgather(gather_nbytes, hosts, local)
  return Link(
    inter + gather.inter,
    intra + gather.intra,
    (1 if hosts > 1 else 0) + gather.rounds_inter,
    (1 if hosts == 1 and local > 1 else 0) + gather.rounds_intra,
    local * intra + gather.intra_host,
  )


def method_links(
  method: str, n: int, hosts: int, local: int
) -> list[Link] | None:
  """Phases (run one after the other) of a method; None if it cannot
  serve this W."""
  w = hosts * local
  if method == "f32":
    return [ring_allreduce(4 * n, hosts, local)]
  if method == "bf16":
    return [ring_allreduce(2 * n, hosts, local)]
  if method.startswith("gq") and method.endswith("psum"):
    bits = int(method[2])
    if psum_levels(bits, w) < 1:
      return None
    return [ring_allreduce(bits / 8 * n, hosts, local)]
  if method.startswith("gq") and method.endswith("bfly"):
    return [butterfly(int(method[2]) / 8 * n, hosts, local)]
  if method.startswith("gq") and method.endswith("2shot"):
    bits = int(method[2])
    return [two_shot(bits / 8 * n, bits / 8 * n, hosts, local)]
  if method.startswith("hier_"):
    inner = method[len("hier_") :]
    block = n / local  # each GPU's share, reduced over the H hosts
    per_gpu = (local - 1) / local * 4 * n
    intra = Link(0.0, per_gpu, 0, local - 1, local * per_gpu)
    if inner == "f32":
      across = ring_allreduce(4 * block, hosts, 1)
    elif inner.endswith("psum"):
      bits = int(inner[2])
      if psum_levels(bits, hosts) < 1:
        return None
      across = ring_allreduce(bits / 8 * block, hosts, 1)
    elif inner.endswith("2shot"):
      code = int(inner[2]) / 8 * block
      across = two_shot(code, code, hosts, 1)
    else:
      across = butterfly(int(inner[2]) / 8 * block, hosts, 1)
    # L GPUs of a host share its link: L blocks cross it.
    across = Link(across.inter * local, 0.0, across.rounds_inter, 0)
    return [intra, across, intra]
  raise ValueError(f"unknown method {method!r}")


def phase_time(
  link: Link,
  inter_bps=INTER_BPS,
  intra_bps=INTRA_BPS,
  alpha_inter=ALPHA_INTER,
  alpha_intra=ALPHA_INTRA,
) -> float:
  return (
    max(link.inter * 8 / inter_bps, link.intra * 8 / intra_bps)
    + link.rounds_inter * alpha_inter
    + link.rounds_intra * alpha_intra
  )


def step_time(
  method: str, n: int, hosts: int, local: int, **kwargs
) -> float | None:
  phases = method_links(method, n, hosts, local)
  if phases is None:
    return None
  return sum(phase_time(p, **kwargs) for p in phases)


METHODS = (
  "f32",
  "bf16",
  "gq8psum",
  "gq4psum",
  "gq8bfly",
  "gq4bfly",
  "gq8_2shot",
  "gq4_2shot",
  "hier_f32",
  "hier_gq8psum",
  "hier_gq4psum",
  "hier_gq4bfly",
  "hier_gq4_2shot",
)
LABELS = {
  "f32": "f32 ring all-reduce",
  "bf16": "bf16 ring all-reduce",
  "gq8psum": "GQ 8-bit psum (flat)",
  "gq4psum": "GQ 4-bit psum (flat)",
  "gq8bfly": "GQ 8-bit butterfly (flat)",
  "gq4bfly": "GQ 4-bit butterfly (flat)",
  "hier_f32": "hierarchical, f32 across hosts",
  "hier_gq8psum": "hierarchical, GQ 8-bit psum across hosts",
  "hier_gq4psum": "hierarchical, GQ 4-bit psum across hosts",
  "hier_gq4bfly": "hierarchical, GQ 4-bit butterfly across hosts",
  "gq8_2shot": "GQ 8-bit two-shot (flat, the default)",
  "gq4_2shot": "GQ 4-bit two-shot (flat, the default)",
  "hier_gq4_2shot": "hierarchical, GQ 4-bit two-shot across hosts",
}


# The emulated cluster's methods (benchmarks/cluster_hierarchical.py).
EMULATED = {
  "f32": "f32",
  "gq4": "gq4bfly",
  "hier_gq4": "hier_gq4bfly",
  "hier_f32": "hier_f32",
}
CLUSTER_RESULTS = os.path.join(HERE, "results", "hierarchical_cluster.md")


def read_cluster_record(path: str = CLUSTER_RESULTS) -> dict:
  """The raw record (JSON block) of the emulated-cluster results."""
  with open(path) as f:
    text = f.read()
  start = text.index("```json\n") + len("```json\n")
  return json.loads(text[start : text.index("\n```", start)])


def emulated_check(
  record: dict, rate: str = "100 Mbit/s", base: str = "unlimited"
) -> list[dict]:
  """Model vs the emulated 2 x 2 cluster, per method: inter-host bytes per
  host, intra-host bytes per host, and the time the slow link adds (step
  at ``rate`` minus step without shaper) vs the model's bytes / rate."""
  hosts, local = 2, 2
  bps = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9}[rate]
  rows = []
  for key, method in EMULATED.items():
    if key not in record["link"]:
      continue
    phases = method_links(method, record["params"], hosts, local)
    inter = sum(p.inter for p in phases)
    intra = sum(p.intra_host for p in phases)
    med = lambda r, k=key: statistics.median(record["times"][r][k])
    rows.append(
      {
        "key": key,
        "method": method,
        "model_inter": inter,
        "measured_inter": record["link"][key]["inter"],
        "model_intra": intra,
        "measured_intra": record["link"][key]["intra"],
        "model_wire_s": inter * 8 / bps,
        "measured_wire_s": med(rate) - med(base),
      }
    )
  return rows


def render(n: int, local: int, workers: list[int]) -> str:
  lines = [
    "# Wire-time model: flat vs hierarchical, up to 4096 GPUs",
    "",
    f"Model of benchmarks/wire_model.py: N = {n:,} gradient elements, "
    f"{local} GPUs per host, {INTER_BPS / 1e9:g} Gbit/s per host between "
    f"hosts, {INTRA_BPS / 8e9:g} GB/s per GPU inside a host, "
    f"α = {ALPHA_INTER * 1e6:g} µs per round across hosts, "
    f"{ALPHA_INTRA * 1e6:g} µs inside. Bandwidth-optimal rings and "
    "butterflies, host-major ranks; n/a: the psum has < 1 level per "
    "worker. Bytes: per host on its inter-host link.",
    "",
    "## Time per step (ms)",
    "",
    "| method | " + " | ".join(f"W={w}" for w in workers) + " |",
    "|---|" + "---:|" * len(workers),
  ]
  for m in METHODS:
    cells = []
    for w in workers:
      t = step_time(m, n, w // local, local)
      cells.append("n/a" if t is None else f"{t * 1e3:.1f}")
    lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "## Inter-host bytes per host per step (GB)",
    "",
    "| method | " + " | ".join(f"W={w}" for w in workers) + " |",
    "|---|" + "---:|" * len(workers),
  ]
  for m in METHODS:
    cells = []
    for w in workers:
      phases = method_links(m, n, w // local, local)
      cells.append(
        "n/a" if phases is None else f"{sum(p.inter for p in phases) / 1e9:.2f}"
      )
    lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
  big = workers[-1]
  t = {m: step_time(m, n, big // local, local) for m in METHODS}
  lines += [
    "",
    "## Reading",
    "",
    f"- At W = {big}: f32 {t['f32'] * 1e3:.0f} ms, flat 4-bit butterfly "
    f"{t['gq4bfly'] * 1e3:.0f} ms, hierarchical 4-bit butterfly "
    f"{t['hier_gq4bfly'] * 1e3:.0f} ms per step: both 4-bit reductions "
    "send about 2 × N/2 bytes per host (a host-major butterfly keeps its "
    "first log₂L levels inside the host), so the hierarchical gain is "
    "in message rounds (log₂H + H − 1 across hosts instead of "
    "log₂W + W − 1) and in quantization noise (W counts hosts), not in "
    "bytes; its two f32 NVLink phases cost "
    f"{2 * (local - 1) / local * 4 * n * 8 / INTRA_BPS * 1e3:.1f} ms.",
    f"- The flat two-shot rows ({t['gq4_2shot'] * 1e3:.0f} ms at 4 bits, "
    f"{t['gq8_2shot'] * 1e3:.0f} ms at 8 bits, W = {big}) are the slowest "
    "compressed ones: the all-to-all cannot combine codes on the way, so "
    f"each host's link carries the codes of all {local} of its GPUs, "
    f"L/2 = {local // 2}× the bytes of a ring. This is why "
    '`reduction="auto"` picks the butterfly on an axis that spans '
    "processes of several devices each; across hosts inside "
    "`hierarchical`, with one device per host, the two-shot reduction "
    f"sends what a ring does ({t['hier_gq4_2shot'] * 1e3:.0f} ms).",
    "- The integer psum ends where its levels do: flat 8-bit at W = 127, "
    "flat 4-bit at W = 7; across hosts, 8-bit serves up to 127 hosts "
    f"(W = {127 * local} with {local} GPUs per host) and 4-bit up to 7.",
    "- The byte saving over the flat butterfly is largest with few "
    "hosts: at H = 2, L = 2 hierarchical sends 2 S (1 − 1/H) = S per "
    "host (S: the code bytes) against 1.25 S (measured below).",
  ]
  if os.path.exists(CLUSTER_RESULTS):
    record = read_cluster_record()
    lines += [
      "",
      "## Check against the emulated 2 × 2 cluster",
      "",
      f"results/hierarchical_cluster.md ({record['date']}; "
      f"N = {record['params']:,}): bytes per host per step, and the time "
      "the 100 Mbit/s link adds to a step (step at 100 Mbit/s minus "
      "step without shaper) vs the model's inter-host bytes × 8 / "
      "100 Mbit/s. Measured bytes include IP/TCP headers.",
      "",
      "| method | inter-host model | measured | intra-host model | "
      "measured | slow-link time model | measured |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in emulated_check(record):
      lines.append(
        f"| {LABELS[row['method']]} | {row['model_inter'] / 2**20:.2f} MiB"
        f" | {row['measured_inter'] / 2**20:.2f} MiB | "
        f"{row['model_intra'] / 2**20:.2f} MiB | "
        f"{row['measured_intra'] / 2**20:.2f} MiB | "
        f"{row['model_wire_s'] * 1e3:.0f} ms | "
        f"{row['measured_wire_s'] * 1e3:.0f} ms |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--elements", type=int, default=1_000_000_000)
  parser.add_argument("--local", type=int, default=8)
  parser.add_argument("--workers", default="16,64,256,1024,4096")
  parser.add_argument(
    "--output", default=os.path.join(HERE, "results", "wire_model.md")
  )
  args = parser.parse_args(argv)
  text = render(
    args.elements, args.local, [int(w) for w in args.workers.split(",")]
  )
  with open(args.output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()

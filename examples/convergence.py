"""Convergence table: every compressor vs the f32 all-reduce, W = 8.

Trains the three examples (vision, language, recommendation) once per
method, with equal steps, seed and data, and writes
``examples/results/convergence.md`` (date, machine, commands, the final
metric of every method against f32) plus one PNG of the curves per example
and the runs' JSON logs::

  python examples/convergence.py            # the full table (~25 CPU min)
  python examples/convergence.py --quick    # a smoke run (a few steps)
  python examples/convergence.py --examples vision --methods f32 gqsgd-4bit

Methods are ``common.COMPRESSORS`` with their bits: f32, bf16, Global-QSGD
8-bit and 4-bit with the library's defaults, 4-bit with the owners' error
feedback, exponential dithering, and the library's baselines that import.
``--seeds N`` runs every method with seeds 0..N-1 and reports mean ± spread.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time
import traceback

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples import common

# (compressor, bits, Global-QSGD's granularity) in table order; the
# baselines only if present. None: the library's default scales (one per
# block of 256 elements).
METHODS = (
  ("f32", 32, None),
  ("bf16", 16, None),
  ("gqsgd", 8, None),
  ("gqsgd", 4, None),
  ("gqsgd_feedback", 4, None),
  ("gqsgd_exp", 8, None),
  ("thc", 4, None),
  ("qsgd", 8, None),
  ("powersgd", 0, None),
  ("acpsgd", 0, None),
  ("jointsq", 0, None),
  ("dgc", 0, None),
)

# Per example: the metric of the table, whether higher is better, how it
# prints, and the run's size (the same for every method).
EXAMPLES = {
  "vision": dict(
    metric="test_accuracy",
    higher=True,
    percent=True,
    full=dict(steps=300, eval_every=50),
    quick=dict(steps=6, eval_every=3, widths=(8, 16), batch_size=64),
  ),
  "language": dict(
    metric="test_perplexity",
    higher=False,
    percent=False,
    full=dict(steps=300, eval_every=50),
    quick=dict(
      steps=6,
      eval_every=3,
      embed_dim=32,
      num_layers=1,
      seq_len=16,
      eval_windows=32,
    ),
  ),
  "recommendation": dict(
    metric="test_auc",
    higher=True,
    percent=True,
    full=dict(steps=200, eval_every=50),
    quick=dict(
      steps=6, eval_every=3, num_train=8192, num_test=2048, batch_size=256
    ),
  ),
}
# The targets of Global-QSGD's defaults against f32 (means over seeds):
# method -> (most accuracy/AUC points lost, most perplexity added in %).
TARGETS = {
  "gqsgd-8bit": (0.2, 1.0),
  "gqsgd-4bit": (0.5, 3.0),
  "gqsgd-4bit-feedback": (0.5, 3.0),
}


def available_methods() -> list[tuple[str, int, str | None]]:
  return [m for m in METHODS if m[0] in common.COMPRESSORS]


def run_one(
  example: str,
  method: tuple[str, int, str | None],
  overrides: dict,
  workers: int,
  seed: int,
  logdir: pathlib.Path,
) -> dict:
  """Trains one method on one example; returns its final record."""
  train = __import__(f"examples.{example}.train", fromlist=["train"])
  default = __import__(
    f"examples.{example}.configs.default", fromlist=["default"]
  )
  compressor, bits, granularity = method
  name = common.method_name(*method)
  config = dataclasses.replace(
    default.get_config(),
    compressor=compressor,
    bits=bits or 4,
    granularity=granularity,
    workers=workers,
    seed=seed,
    log=str(logdir / log_name(example, name, seed)),
    progress=sys.stderr.isatty(),
    **overrides,
  )
  cpu = time.process_time()
  final = train.train_and_evaluate(config)
  return {"name": name, "cpu_time_s": time.process_time() - cpu, **final}


def log_name(example: str, name: str, seed: int) -> str:
  return f"{example}_{name}{f'_seed{seed}' if seed else ''}.json"


def aggregate(finals: list[dict], metric: str) -> dict:
  """One table row from a method's runs over seeds: the first run's record
  with the metric, train loss and times averaged, and the metric's spread.
  """
  row = dict(finals[0])
  for key in (metric, "train_loss", "step_s", "wall_time_s", "cpu_time_s"):
    row[key] = float(sum(f[key] for f in finals) / len(finals))
  values = [f[metric] for f in finals]
  row["seeds"] = len(values)
  row[f"{metric}_std"] = float(
    (sum((v - row[metric]) ** 2 for v in values) / max(len(values) - 1, 1))
    ** 0.5
  )
  row[f"{metric}_runs"] = values
  return row


def _fmt(value: float, percent: bool) -> str:
  return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def format_table(example: str, rows: list[dict]) -> str:
  """A markdown table: metric, change vs f32, bytes sent, time."""
  spec = EXAMPLES[example]
  metric, percent = spec["metric"], spec["percent"]
  base = next(
    (r for r in rows if r["name"] == "f32" and "error" not in r), None
  )
  unit = " (%)" if percent else ""
  lines = [
    f"| method | {metric.replace('test_', 'test ')}{unit} | vs f32 "
    f"| train loss | sent B/step/device | vs f32 | step (ms) | "
    "wall (s) | CPU (s) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 7)
      continue
    value = r[metric]
    shown = _fmt(value, percent)
    if r.get("seeds", 1) > 1:
      shown += f" ± {_fmt(r[f'{metric}_std'], percent)}"
    delta = ratio = ""
    if base is not None:
      d = value - base[metric]
      delta = (
        f"{100 * d:+.2f} pt"
        if percent
        else f"{d:+.3f} ({100 * d / base[metric]:+.1f}%)"
      )
      ratio = f"{base['sent_bytes'] / max(r['sent_bytes'], 1):.1f}x"
    lines.append(
      f"| {r['name']} | {shown} | {delta} | "
      f"{r['train_loss']:.4f} | {r['sent_bytes']:,.0f} | {ratio} | "
      f"{1000 * r['step_s']:.0f} | {r['wall_time_s']:.0f} | "
      f"{r['cpu_time_s']:.0f} |"
    )
  return "\n".join(lines)


def target_check(example: str, rows: list[dict]) -> list[str]:
  """Global-QSGD's defaults against their targets (``TARGETS``)."""
  spec = EXAMPLES[example]
  metric = spec["metric"]
  base = next(
    (r for r in rows if r["name"] == "f32" and "error" not in r), None
  )
  out = []
  for r in rows:
    if base is None or r["name"] not in TARGETS or "error" in r:
      continue
    points, percent = TARGETS[r["name"]]
    if spec["higher"]:
      loss, limit = 100 * (base[metric] - r[metric]), points
      shown = f"f32 minus it = {loss:+.2f} points"
      goal = f"{points:g}-point"
    else:
      loss, limit = 100 * (r[metric] / base[metric] - 1), percent
      shown = f"it is {loss:+.1f}% vs f32"
      goal = f"+{percent:g}%"
    verdict = "meets" if loss <= limit else "MISSES"
    seeds = r.get("seeds", 1)
    over = f" (means over {seeds} seeds)" if seeds > 1 else ""
    out.append(f"{r['name']}: {shown}{over}, {verdict} the {goal} target")
  return out


def machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(
        line.split(":", 1)[1].strip()
        for line in f
        if line.startswith("model name")
      )
  except (OSError, StopIteration):
    pass
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (
    f"{platform.node()}: {cpu}, {os.cpu_count()} cores, "
    f"{platform.system()} {platform.release()}; Python "
    f"{platform.python_version()}, JAX {jax.__version__} "
    f"({jax.default_backend()}, {jax.device_count()} devices); load "
    f"average at the start {load}"
  )


def write_report(
  path: pathlib.Path,
  *,
  results: dict,
  sizes: dict,
  pngs: dict,
  command: str,
  started: datetime.datetime,
  elapsed: float,
  machine_info: str,
  workers: int,
  seeds: list[int],
  quick: bool,
  notes: str = "",
) -> None:
  """Writes the markdown report (see the module docstring)."""
  lines = [
    "# Convergence of every method vs the f32 all-reduce"
    + (" (quick smoke run)" if quick else ""),
    "",
    f"- Date: {started:%Y-%m-%d %H:%M} UTC; total {elapsed / 60:.1f} min "
    f"wall, {cpu_minutes(results):.1f} min of CPU time in training runs",
    f"- Machine: {machine_info}",
    f"- Command: `{command}`",
    f"- W = {workers} data-parallel devices; "
    + (
      f"seed {seeds[0]} for every run"
      if len(seeds) == 1
      else f"seeds {', '.join(map(str, seeds))} for every method (a row shows "
      "the mean ± the standard deviation over seeds)"
    )
    + "; equal steps, data and hyperparameters per example. One run: "
    "`python examples/<example>/main.py --workers 8 --steps S "
    "--compressor C --bits B --seed N`.",
    "- sent B/step/device: what one device transmits per step with "
    "bandwidth-optimal collectives, read from the compiled step "
    "(`gqsgd_jax.wire_report`).",
    "- Targets: Global-QSGD's 8-bit default loses at most 0.2 points of "
    "accuracy/AUC and adds at most 1% perplexity against f32; the 4-bit "
    "default at most 0.5 points and 3%.",
    "",
  ]
  for example, rows in results.items():
    size = ", ".join(f"{k}={v}" for k, v in sizes[example].items())
    first = next((r for r in rows if "error" not in r), {})
    lines += [
      f"## {example}",
      "",
      f"{_describe(example, first)} Run size: {size}.",
      "",
      format_table(example, rows),
      "",
    ]
    lines += [f"- {line}" for line in target_check(example, rows)]
    if example in pngs:
      lines += ["", f"![{example}]({pngs[example].name})"]
    lines.append("")
  if notes:
    lines += ["## Notes", "", notes.strip(), ""]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines))


def cpu_minutes(results: dict) -> float:
  return (
    sum(
      r.get("cpu_time_s", 0) * r.get("seeds", 1)
      for rows in results.values()
      for r in rows
    )
    / 60
  )


def _describe(example: str, r: dict) -> str:
  if example == "vision":
    return (
      f"ResNet ({r.get('num_params', 0):,} params) on scikit-learn's "
      "digits (1437 train / 360 test), SGD + momentum, cosine "
      "schedule; metric: test accuracy."
    )
  if example == "language":
    return (
      f"Byte-level causal Transformer ({r.get('num_params', 0):,} "
      "params) on CPython's pydoc topics (the last 10% of every topic "
      "held out), Adam; metric: held-out perplexity per byte (lower "
      "is better)."
    )
  auc = r.get("oracle_auc")
  ceiling = f" (the hidden model's own AUC: {100 * auc:.2f})" if auc else ""
  return (
    f"DeepFwFM ({r.get('num_params', 0):,} params, "
    f"{100 * r.get('embedding_fraction', 0):.0f}% embedding rows) on "
    "synthetic Criteo-shaped clicks from a hidden FwFM, Adam; metric: "
    f"test AUC{ceiling}."
  )


def plot_example(
  example: str,
  rows: list[dict],
  logdir: pathlib.Path,
  outdir: pathlib.Path,
  quick: bool,
) -> pathlib.Path | None:
  """The PNG of an example's curves (seed 0 of every method that ran)."""
  from examples import plot  # pylint: disable=g-import-not-at-top

  logs = [
    logdir / log_name(example, r["name"], 0) for r in rows if "error" not in r
  ]
  if not logs:
    return None
  return plot.plot_runs(
    [common.read_log(p) for p in logs],
    outdir / f"convergence_{example}{'_quick' if quick else ''}.png",
    metrics=["train_loss", EXAMPLES[example]["metric"]],
  )


NOTES_FILE = "convergence_notes.md"  # hand-written analysis, appended


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a few steps of small models: checks the script",
  )
  parser.add_argument(
    "--examples", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES)
  )
  parser.add_argument(
    "--methods",
    nargs="+",
    help="method names (e.g. f32 gqsgd-4bit); default all",
  )
  parser.add_argument(
    "--scale",
    type=float,
    default=1.0,
    help="multiply every example's steps (and evaluation interval) by this",
  )
  parser.add_argument("--workers", type=int, default=8)
  parser.add_argument(
    "--seeds",
    type=int,
    default=1,
    help="run every method with seeds 0..N-1 and report the mean and spread",
  )
  parser.add_argument(
    "--outdir", default=str(pathlib.Path(__file__).resolve().parent / "results")
  )
  parser.add_argument(
    "--report-only",
    action="store_true",
    help="rewrite the report from the last run's results "
    "(e.g. after editing " + NOTES_FILE + ")",
  )
  args = parser.parse_args(argv)
  outdir = pathlib.Path(args.outdir)
  stem = "convergence_quick" if args.quick else "convergence"
  if args.report_only:
    saved = common.read_log(outdir / f"{stem}.json")
    notes_path = outdir / NOTES_FILE
    saved["notes"] = (
      "" if args.quick or not notes_path.exists() else (notes_path.read_text())
    )
    saved["started"] = datetime.datetime.fromisoformat(saved["started"])
    logdir = outdir / ("logs_quick" if args.quick else "logs")
    pngs = {
      example: plot_example(example, rows, logdir, outdir, args.quick)
      for example, rows in saved["results"].items()
    }
    saved["pngs"] = {k: v for k, v in pngs.items() if v is not None}
    write_report(outdir / f"{stem}.md", **saved)
    print(f"wrote {outdir / f'{stem}.md'}")
    return
  common.request_cpu_devices(args.workers)  # before JAX starts a backend

  started = datetime.datetime.now(datetime.UTC)
  start = time.perf_counter()
  info = machine()
  logdir = outdir / ("logs_quick" if args.quick else "logs")
  methods = [
    m
    for m in available_methods()
    if not args.methods or common.method_name(*m) in args.methods
  ]
  print(f"methods: {[common.method_name(*m) for m in methods]}", flush=True)
  results, sizes, pngs = {}, {}, {}
  for example in args.examples:
    spec = EXAMPLES[example]
    overrides = dict(spec["quick" if args.quick else "full"])
    for k in ("steps", "eval_every"):
      overrides[k] = max(1, round(overrides[k] * args.scale))
    sizes[example] = overrides
    rows = []
    for method in methods:
      name = common.method_name(*method)
      finals = []
      try:
        for seed in range(args.seeds):
          finals.append(
            run_one(example, method, overrides, args.workers, seed, logdir)
          )
        final = aggregate(finals, spec["metric"])
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        final = {
          "name": name,
          "error": f"{type(e).__name__}: "
          f"{str(e).splitlines()[0][:120] if str(e) else ''}",
        }
      rows.append(final)
      shown = (
        _fmt(final[spec["metric"]], spec["percent"])
        if "error" not in final
        else final["error"]
      )
      print(
        f"{example} {name}: {spec['metric']} {shown} "
        f"({final.get('wall_time_s', 0):.0f} s)",
        flush=True,
      )
    results[example] = rows
    png = plot_example(example, rows, logdir, outdir, args.quick)
    if png:
      pngs[example] = png
    print(format_table(example, rows), flush=True)

  notes_path = outdir / NOTES_FILE
  notes = notes_path.read_text() if notes_path.exists() else ""
  command = "python examples/convergence.py " + " ".join(
    argv if argv is not None else sys.argv[1:]
  )
  saved = dict(
    results=results,
    sizes=sizes,
    pngs=pngs,
    command=command.strip(),
    started=started,
    elapsed=time.perf_counter() - start,
    machine_info=info,
    workers=args.workers,
    seeds=list(range(args.seeds)),
    quick=args.quick,
  )
  common.write_log(
    outdir / f"{stem}.json",
    dict(
      saved,
      started=started.isoformat(),
      pngs={k: str(v) for k, v in pngs.items()},
    ),
  )
  write_report(
    outdir / f"{stem}.md", notes="" if args.quick else notes, **saved
  )
  print(
    f"wrote {outdir / f'{stem}.md'} "
    f"({(time.perf_counter() - start) / 60:.1f} min)"
  )


if __name__ == "__main__":
  main()

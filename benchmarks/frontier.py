"""Quality vs bits on the wire for Global-QSGD's scale configurations.

Two measurements on the language and recommendation examples, W = 8
simulated CPU devices:

* ``probe``: the relative error ||q - g||^2 / ||g||^2 of the quantized mean
  q against the exact mean g, on the gradients of the f32 run. The probe is
  a compressor that passes the exact f32 mean on (training follows f32) and,
  every ``--every`` steps, runs every candidate quantizer on the same local
  gradients (one compiled program, one ``lax.cond``).
* ``train``: training runs of chosen configurations (the examples' own
  training loop, ``examples/convergence.py``'s ``run_one``), reported
  against f32 of the same seed.

Bits on the wire per element = code bits (``wire.wire_bits_per_element``)
+ scale bits (scale bytes * 8 / block size; ~0 for one scale per bucket).

  python benchmarks/frontier.py probe --examples language recommendation
  python benchmarks/frontier.py train --configs 8:block256-f32:auto ...
  python benchmarks/frontier.py report   # markdown + PNG from the JSONs

A configuration is ``bits:scales:reduction`` with scales one of "bucket",
"leaf", "block<B>-<format>" (format f32, bf16 or e8m0) or "default", and
reduction "auto", "psum", "butterfly", "two_shot" or "exp" (exponential
dithering). "two_shot" takes options "-g<bits>" (the all-gather's bits)
and "-ef" (the owners' error feedback), e.g. "4:default:two_shot-g8".
"""

import argparse
import datetime
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
PROBE_JSON = RESULTS / "frontier_probe.json"
TRAIN_JSON = RESULTS / "frontier_train.json"
WORKERS = 8
_SCALE_BYTES = {"f32": 4, "bf16": 2, "e8m0": 1}


def parse_config(text: str) -> dict:
  """ "bits:scales:reduction" -> global_quantize kwargs and wire bits."""
  from gqsgd_jax._src import global_quantize as gq  # pylint: disable=g-import-not-at-top
  from gqsgd_jax._src import wire  # pylint: disable=g-import-not-at-top

  bits_s, scales, reduction = text.split(":")
  bits = int(bits_s)
  kwargs = dict(bits=bits)
  # two_shot options: "-g<bits>" (gather_bits), "-ef" (owner_feedback)
  reduction, *options = reduction.split("-")
  gather_bits = bits
  for option in options:
    if option == "ef":
      kwargs["owner_feedback"] = True
    elif option.startswith("g"):
      gather_bits = kwargs["gather_bits"] = int(option[1:])
    else:
      raise ValueError(f"unknown reduction option {option!r} in {text!r}")
  if reduction == "exp":
    kwargs["dithering"] = "exponential"
  else:
    kwargs["reduction"] = reduction
  if scales == "default":
    cfg = gq.default_config(bits)
  elif scales in ("bucket", "leaf"):
    cfg = dict(granularity=scales)
  else:
    size, fmt = scales[len("block") :].split("-")
    cfg = dict(granularity="block", block_size=int(size), scale_format=fmt)
  kwargs.update(cfg)
  signed = (
    reduction in ("psum", "auto")
    and bits == 8
    and (reduction != "auto" or WORKERS <= 16)
  )
  code_bits = wire.wire_bits_per_element(bits, signed)
  if reduction == "two_shot":  # bits up (all-to-all), gather_bits down
    code_bits = (code_bits + wire.wire_bits_per_element(gather_bits)) / 2
  scale_bits = 0.0
  if cfg.get("granularity") == "block":
    scale_bits = 8 * _SCALE_BYTES[cfg["scale_format"]] / cfg["block_size"]
  return dict(
    name=text,
    kwargs=kwargs,
    code_bits=code_bits,
    scale_bits=scale_bits,
    wire_bits=code_bits + scale_bits,
  )


def probe_configs() -> list[str]:
  out = []
  for bits, reductions in ((8, ("psum", "butterfly")), (4, ("butterfly",))):
    for red in reductions:
      out += [f"{bits}:bucket:{red}", f"{bits}:leaf:{red}"]
      for size in (32, 64, 128, 256):
        for fmt in ("f32", "bf16", "e8m0"):
          out.append(f"{bits}:block{size}-{fmt}:{red}")
  out += ["8:bucket:exp", "8:block64-e8m0:exp", "8:block256-f32:exp"]
  out += TWO_SHOT_PROBES
  return out


# The two-shot reduction (owner feedback needs state across steps, so it
# is measured by training runs only).
TWO_SHOT_PROBES = [
  "8:block256-f32:two_shot",
  "4:block256-bf16:two_shot",
  "4:block64-bf16:two_shot",
  "4:block256-bf16:two_shot-g6",
  "4:block256-bf16:two_shot-g8",
]


def _install_compressor_hook():
  """Lets the examples' granularity field carry a frontier configuration."""
  from examples import common  # pylint: disable=g-import-not-at-top
  import gqsgd_jax  # pylint: disable=g-import-not-at-top

  original = common.make_compressor

  def make_compressor(
    name,
    bits=4,
    *,
    axis_name=common.AXIS,
    seed=0,
    reduction="auto",
    granularity="bucket",
    **kwargs,
  ):
    if name == "gqsgd" and ":" in granularity:
      cfg = parse_config(granularity)
      return gqsgd_jax.global_quantize(
        axis_name=axis_name, key=seed, **cfg["kwargs"]
      )
    if name == "probe":
      return _probe_compressor(axis_name, seed)
    return original(
      name,
      bits,
      axis_name=axis_name,
      seed=seed,
      reduction=reduction,
      granularity=granularity,
      **kwargs,
    )

  common.make_compressor = make_compressor
  if "probe" not in common.COMPRESSORS:
    common.COMPRESSORS = tuple(common.COMPRESSORS) + ("probe",)


_PROBE_LOG: dict = {}
_PROBE_EVERY = [50]
_PROBE_NAMES: list = []  # the configurations of this probe run


def _probe_compressor(axis_name, seed):
  """The exact f32 mean, plus every candidate's relative error on probes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import gqsgd_jax  # pylint: disable=g-import-not-at-top

  names = _PROBE_NAMES
  txs = [
    gqsgd_jax.global_quantize(axis_name=axis_name, **parse_config(n)["kwargs"])
    for n in names
  ]
  exact = gqsgd_jax.psum_mean(axis_name=axis_name)

  def init_fn(params):
    del params
    return jnp.zeros([], jnp.int32)

  def update_fn(updates, count, params=None):
    mean, _ = exact.update(updates, exact.init(None))
    norm = sum(
      jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(mean)
    )

    def probe(_):
      errs = []
      for i, tx in enumerate(txs):
        key = jax.random.fold_in(jax.random.PRNGKey(seed + 1000 * i), count)
        q, _ = tx.update(updates, gqsgd_jax.GlobalQuantizeState(key))
        errs.append(
          sum(
            jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(mean))
          )
          / norm
        )
      return jnp.stack(errs)

    every = _PROBE_EVERY[0]
    errs = jax.lax.cond(
      count % every == 0, probe, lambda _: jnp.zeros(len(names)), None
    )

    def record(step, values):
      step = int(step)
      if step % every == 0:
        _PROBE_LOG[step] = [float(v) for v in values]

    jax.debug.callback(record, count, errs)
    return mean, count + 1

  return optax.GradientTransformation(init_fn, update_fn)


def _machine() -> dict:
  from examples import convergence  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.UTC)
  return dict(
    date=now.strftime("%Y-%m-%d %H:%M UTC"), machine=convergence.machine()
  )


def _load(path):
  return json.loads(path.read_text()) if path.exists() else {}


def cmd_probe(args):
  from examples import convergence  # pylint: disable=g-import-not-at-top

  _PROBE_EVERY[0] = args.every
  results = _load(PROBE_JSON)
  # --configs adds configurations to an existing probe of the same f32 run
  # (same seed, steps and probe steps); without it every default one runs.
  names = args.configs or probe_configs()
  _PROBE_NAMES[:] = names
  for example in args.examples:
    _PROBE_LOG.clear()
    overrides = dict(convergence.EXAMPLES[example]["full"])
    if args.steps:
      overrides["steps"] = args.steps
    start = time.perf_counter()
    final = convergence.run_one(
      example,
      ("probe", 32, "bucket"),
      overrides,
      WORKERS,
      args.seed,
      pathlib.Path("/tmp"),
    )
    steps = sorted(_PROBE_LOG)
    mean = [
      sum(_PROBE_LOG[s][i] for s in steps) / len(steps)
      for i in range(len(names))
    ]
    record = dict(
      **_machine(),
      steps=overrides["steps"],
      probe_steps=steps,
      wall_s=time.perf_counter() - start,
      metric=final.get(convergence.EXAMPLES[example]["metric"]),
      configs={
        n: dict(
          rel_mse=m,
          per_step=[_PROBE_LOG[s][i] for s in steps],
          **{k: v for k, v in parse_config(n).items() if k != "kwargs"},
        )
        for i, (n, m) in enumerate(zip(names, mean))
      },
    )
    if args.configs and example in results:
      if results[example]["probe_steps"] != steps:
        raise ValueError(
          f"{example}: probe steps {steps} differ from the recorded "
          f"{results[example]['probe_steps']}; re-run the whole probe"
        )
      for config in record["configs"].values():
        config["date"] = record["date"]
      results[example]["configs"].update(record["configs"])
    else:
      results[example] = record
    PROBE_JSON.write_text(json.dumps(results, indent=1))
    print(
      f"{example}: probed {len(names)} configs at steps {steps} in "
      f"{time.perf_counter() - start:.0f} s",
      flush=True,
    )


def cmd_train(args):
  from examples import convergence  # pylint: disable=g-import-not-at-top

  results = _load(TRAIN_JSON)
  for example in args.examples:
    spec = convergence.EXAMPLES[example]
    overrides = dict(spec["full"])
    if args.steps:
      overrides["steps"] = args.steps
    for seed in args.seeds:
      for config in args.configs:
        key = f"{example}|{config}|{seed}|{overrides['steps']}"
        if key in results and not args.force:
          continue
        if config == "f32":
          method = ("f32", 32, "bucket")
        elif config == "bf16":
          method = ("bf16", 16, "bucket")
        else:
          method = ("gqsgd", int(config.split(":")[0]), config)
        start = time.perf_counter()
        final = convergence.run_one(
          example, method, overrides, WORKERS, seed, pathlib.Path("/tmp")
        )
        info = (
          parse_config(config)
          if ":" in config
          else dict(
            wire_bits=float(method[1]),
            code_bits=float(method[1]),
            scale_bits=0.0,
          )
        )
        results[key] = dict(
          **_machine(),
          example=example,
          config=config,
          seed=seed,
          steps=overrides["steps"],
          metric=final[spec["metric"]],
          sent_bytes=final["sent_bytes"],
          wall_s=time.perf_counter() - start,
          **{k: v for k, v in info.items() if k != "kwargs"},
        )
        TRAIN_JSON.write_text(json.dumps(results, indent=1))
        print(
          f"{key}: {spec['metric']}={final[spec['metric']]:.4f} "
          f"({time.perf_counter() - start:.0f} s)",
          flush=True,
        )


def _train_rows(results, example):
  """Per config: mean metric over seeds, and the f32 mean of the same seeds."""
  rows = {}
  for r in results.values():
    if r["example"] == example:
      rows.setdefault(r["config"], []).append(r)
  base = {r["seed"]: r["metric"] for r in rows.get("f32", [])}
  out = []
  for config, runs in rows.items():
    runs = [r for r in runs if r["seed"] in base]
    if not runs:
      continue
    metric = sum(r["metric"] for r in runs) / len(runs)
    ref = sum(base[r["seed"]] for r in runs) / len(runs)
    out.append(
      dict(
        config=config,
        metric=metric,
        f32=ref,
        seeds=len(runs),
        wire_bits=runs[0]["wire_bits"],
        scale_bits=runs[0]["scale_bits"],
        sent_bytes=runs[0]["sent_bytes"],
      )
    )
  return sorted(out, key=lambda r: (-r["wire_bits"], r["config"]))


def _added_lines(configs: dict) -> list[str]:
  """Lines naming the probe rows added later (``probe --configs``)."""
  dates = sorted({c["date"] for c in configs.values() if "date" in c})
  lines = []
  for date in dates:
    names = sorted(n for n, c in configs.items() if c.get("date") == date)
    lines.append(
      "- Added later on the same f32 run (seed, steps, probe steps): "
      f"{', '.join(names)} on {date}."
    )
  return lines


def cmd_report(args):
  del args
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  probe, train = _load(PROBE_JSON), _load(TRAIN_JSON)
  examples = [
    e
    for e in ("language", "recommendation", "vision")
    if e in probe or any(r["example"] == e for r in train.values())
  ]
  lines = [
    "# Frontier: quality vs bits on the wire (Global-QSGD scales)",
    "",
    "Generated by `python benchmarks/frontier.py report` from "
    "`frontier_probe.json` and `frontier_train.json` (commands in "
    "`benchmarks/frontier.py`). W = 8 simulated CPU devices. Bits on "
    "the wire per element = code bits + scale bits (scale bytes x 8 / "
    "block size); the butterfly sends its codes once in the "
    "reduce-scatter and once in the all-gather, as a ring all-reduce "
    "does, so bits per element compare across reductions; the two-shot "
    "reduction sends `bits` up and `gather_bits` down (`-g<bits>`), "
    "counted as their mean. `-ef`: the owners' error feedback "
    "(`owner_feedback=True`).",
    "",
  ]
  fig, axes = plt.subplots(
    2, len(examples), figsize=(6 * len(examples), 9), squeeze=False
  )
  for col, example in enumerate(examples):
    lines += [f"## {example}", ""]
    if example not in probe:
      axes[0][col].axis("off")
    if example in probe:
      p = probe[example]
      lines += [
        "### Relative error of the quantized mean on the f32 run's gradients",
        "",
        f"- {p['date']}; {p['machine']}",
        f"- ||q - g||^2 / ||g||^2 of one quantized mean q against the exact "
        f"mean g, averaged over the f32 run's steps {p['probe_steps']} "
        f"({p['steps']} steps in all).",
        *_added_lines(p["configs"]),
        "",
        "| configuration | bits/element | scale share of payload | rel. MSE |",
        "|---|---:|---:|---:|",
      ]
      items = sorted(
        p["configs"].values(),
        key=lambda c: (c["name"].split(":")[0], c["rel_mse"]),
      )
      for c in items:
        lines.append(
          f"| {c['name']} | {c['wire_bits']:.3f} | "
          f"{100 * c['scale_bits'] / c['code_bits']:.1f}% | "
          f"{c['rel_mse']:.4f} |"
        )
      lines.append("")
      ax = axes[0][col]
      for fmt, marker in (
        ("f32", "o"),
        ("bf16", "s"),
        ("e8m0", "^"),
        ("bucket", "x"),
        ("leaf", "+"),
      ):
        for red, color in (
          ("psum", "C0"),
          ("butterfly", "C1"),
          ("exp", "C2"),
          ("two_shot", "C3"),
        ):
          pts = [
            c
            for c in items
            if c["name"].split(":")[2].split("-")[0] == red
            and (fmt in c["name"].split(":")[1])
          ]
          if pts:
            ax.scatter(
              [c["wire_bits"] for c in pts],
              [c["rel_mse"] for c in pts],
              marker=marker,
              color=color,
              label=f"{fmt}, {red}",
            )
      ax.set_yscale("log")
      ax.set_xlabel("bits per element on the wire (codes + scales)")
      ax.set_ylabel("relative MSE of the mean")
      ax.set_title(f"{example}: error of the quantized mean")
      ax.legend(fontsize=7)
    rows = _train_rows(train, example)
    if rows:
      higher = example != "language"
      seeds = sorted(
        {r["seed"] for r in train.values() if r["example"] == example}
      )
      any_run = next(r for r in train.values() if r["example"] == example)
      lines += [
        "### Training runs",
        "",
        f"- {any_run['date']}; {any_run['machine']}",
        f"- {any_run['steps']} steps, seeds {seeds}; every row against f32 "
        "of the same seeds.",
        "",
        "| configuration | bits/element | metric | vs f32 | seeds |",
        "|---|---:|---:|---:|---:|",
      ]
      xs, ys, names = [], [], []
      for r in rows:
        if higher:
          delta = f"{100 * (r['metric'] - r['f32']):+.2f} pt"
          shown = f"{100 * r['metric']:.2f}"
        else:
          delta = f"{100 * (r['metric'] / r['f32'] - 1):+.1f}%"
          shown = f"{r['metric']:.3f}"
        lines.append(
          f"| {r['config']} | {r['wire_bits']:.3f} | {shown} | "
          f"{delta} | {r['seeds']} |"
        )
        xs.append(r["wire_bits"])
        ys.append(r["metric"] if not higher else 100 * r["metric"])
        names.append(r["config"])
      lines.append("")
      ax = axes[1][col]
      ax.scatter(xs, ys)
      for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), fontsize=6)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("bits per element on the wire (codes + scales)")
      ax.set_ylabel(
        {"language": "test perplexity", "vision": "test accuracy (%)"}.get(
          example, "test AUC (%)"
        )
      )
      ax.set_title(f"{example}: final metric")
  fig.tight_layout()
  fig.savefig(RESULTS / "frontier.png", dpi=110)
  lines += ["![frontier](frontier.png)", ""]
  notes = RESULTS / "frontier_notes.md"
  if notes.exists():
    lines += [notes.read_text()]
  (RESULTS / "frontier.md").write_text("\n".join(lines))
  print(f"wrote {RESULTS / 'frontier.md'}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("probe")
  p.add_argument(
    "--examples", nargs="+", default=["language", "recommendation"]
  )
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--configs",
    nargs="+",
    help="probe only these and add them to the recorded probe",
  )
  t = sub.add_parser("train")
  t.add_argument(
    "--examples", nargs="+", default=["language", "recommendation"]
  )
  t.add_argument("--configs", nargs="+", required=True)
  t.add_argument("--seeds", nargs="+", type=int, default=[0])
  t.add_argument("--steps", type=int, default=0)
  t.add_argument("--force", action="store_true")
  sub.add_parser("report")
  args = parser.parse_args()
  if args.cmd == "report":
    return cmd_report(args)
  from examples import common  # pylint: disable=g-import-not-at-top

  common.request_cpu_devices(WORKERS)  # before JAX starts a backend
  _install_compressor_hook()
  {"probe": cmd_probe, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
  main()

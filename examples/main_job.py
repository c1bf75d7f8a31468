"""The main job: Global-QSGD 4-bit vs the f32 all-reduce on 8 devices.

Trains the vision example (a small ResNet on scikit-learn's digits) twice,
data-parallel over 8 simulated CPU devices (or every GPU), with equal steps
and seed, and prints each method's test accuracy and the collective bytes
per step and device of its compiled train step::

  python examples/main_job.py [--steps N] [--logdir DIR]
"""

import argparse
import dataclasses
import pathlib
import sys
import time

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples import common

METHODS = (("f32", 32), ("gqsgd", 4))


def format_table(rows: list[dict]) -> str:
  """Method, accuracy and wire bytes; ratios against the first row."""
  base = rows[0]["sent_bytes"]
  lines = [
    f"{'method':<12} {'test acc':>8} {'sent B/step':>12} "
    f"{'vs f32':>7} {'payload B/step':>15} {'float payload':>14}"
  ]
  for r in rows:
    lines.append(
      f"{r['name']:<12} {r['test_accuracy']:>8.2%} {r['sent_bytes']:>12,.0f}"
      f" {base / r['sent_bytes']:>6.2f}x {r['payload_bytes']:>15,}"
      f" {r['float_payload_bytes']:>14,}"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, help="train steps per method")
  parser.add_argument("--workers", type=int, default=8)
  parser.add_argument("--logdir", help="write JSON logs and a plot here")
  args = parser.parse_args(argv)
  common.request_cpu_devices(args.workers)  # before JAX starts a backend
  from examples.vision import train
  from examples.vision.configs import default

  start = time.perf_counter()
  config = default.get_config()
  config = dataclasses.replace(
    config, workers=args.workers, steps=args.steps or config.steps
  )
  rows, logs = [], []
  for compressor, bits in METHODS:
    name = common.method_name(compressor, bits)
    log = None
    if args.logdir:
      log = str(pathlib.Path(args.logdir) / f"vision_{name}.json")
      logs.append(log)
    run = dataclasses.replace(config, compressor=compressor, bits=bits, log=log)
    final = train.train_and_evaluate(run)
    rows.append({"name": name, **final})
    print(
      f"{name}: test accuracy {final['test_accuracy']:.2%} after "
      f"{config.steps} steps ({final['wall_time_s']:.0f} s)",
      flush=True,
    )

  print()
  print(
    f"vision example: ResNet ({rows[0]['num_params']:,} params) on "
    f"scikit-learn digits, {rows[0]['workers']} workers, {config.steps} "
    f"steps, seed {config.seed}"
  )
  print(
    "bytes per step and device, read from each compiled train step "
    "(gqsgd_jax.wire_report):\n  sent = what a device transmits with "
    "bandwidth-optimal collectives (ring all-reduce: 2(W-1)/W of the "
    "buffer);\n  payload = collective result bytes; float payload = "
    "floating-point part of it"
  )
  print(format_table(rows))
  for r in rows:
    ops = ", ".join(f"{op} {b:,}" for op, b in r["by_op"].items())
    print(f"  {r['name']}: {ops}")
  if logs:
    from examples import plot

    png = pathlib.Path(args.logdir) / "vision.png"
    plot.plot_runs([common.read_log(p) for p in logs], png)
    print(f"logs and plot: {args.logdir}")
  print(f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()

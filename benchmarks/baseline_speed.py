"""Step time of the baselines' update next to the f32 psum, side by side.

    python benchmarks/baseline_speed.py [--repeats 9] [--methods a,b,...]
        [--out benchmarks/results/baseline_speed.md] [--no-write]

Times one compiled ``tx.update`` (the compressor alone, no model) on a
gradient pytree shaped like a ~120k-parameter MLP (four dense kernels and
their biases), W = 8 simulated CPU devices under ``jax.shard_map``, the
per-worker state laid out with ``gqsgd_jax.worker_state_specs`` and threaded
from step to step. Each method is warmed up, then the methods run
round-robin (one step of each per round, ``_common.median_times``) so that a
change in the machine's load hits all of them alike; the table gives the
median per step and its ratio to the f32 psum of the same run.

The settings are those of ``examples/common.py`` (bits = 4): thc 16 levels,
qsgd 7 levels, powersgd and acpsgd rank 4, jointsq ratio 0.032; lgreco (not
in the examples) rank 4. powersgd and lgreco start compressing at step 0
(``start_iter=0``); lgreco's rank adjustment (every 100 steps) is compiled
in but does not run during the measured steps.

The result file keeps everything outside its "Latest run" section, so notes
(e.g. before/after comparisons) survive a rerun.
"""

import argparse
import os
import sys

import jax

# Before any backend starts (hence the imports below it).
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import gqsgd_jax  # noqa: E402

import _common  # noqa: E402

NUM_WORKERS = 8
AXIS = "data"
# (name, shape): an MLP 64 -> 256 -> 256 -> 128 -> 10, 116 618 parameters.
SHAPES = (
  ("dense0/kernel", (64, 256)),
  ("dense0/bias", (256,)),
  ("dense1/kernel", (256, 256)),
  ("dense1/bias", (256,)),
  ("dense2/kernel", (256, 128)),
  ("dense2/bias", (128,)),
  ("dense3/kernel", (128, 10)),
  ("dense3/bias", (10,)),
)
# The recommendation example's DeepFwFM (examples/recommendation, default
# config): 532 770 parameters, 85% of them in one embedding table.
REC_SHAPES = (
  ("embeddings", (56554, 8)),
  ("first_order", (56554, 1)),
  ("dense_embed", (13, 8)),
  ("dense_first_order", (13,)),
  ("field_weights", (39, 39)),
  ("bias", (1,)),
  ("mlp0/kernel", (312, 64)),
  ("mlp0/bias", (64,)),
  ("mlp1/kernel", (64, 32)),
  ("mlp1/bias", (32,)),
  ("mlp_out/kernel", (32, 1)),
  ("mlp_out/bias", (1,)),
)
MODELS = {"mlp": SHAPES, "recommendation": REC_SHAPES}
DEFAULT_OUT = os.path.join(
  os.path.dirname(__file__), "results", "baseline_speed.md"
)
BEGIN = "<!-- baseline_speed: latest run (rewritten by the script) -->"
END = "<!-- baseline_speed: end of latest run -->"


def methods() -> dict:
  """The compressors, with examples/common.py's settings (bits = 4)."""
  return {
    "f32": lambda: gqsgd_jax.psum_mean(axis_name=AXIS),
    "jointsq": lambda: gqsgd_jax.jointsq(
      compression_ratio=0.032, axis_name=AXIS
    ),
    "powersgd": lambda: gqsgd_jax.powersgd(
      rank=4, start_iter=0, axis_name=AXIS
    ),
    "acpsgd": lambda: gqsgd_jax.acpsgd(rank=4, axis_name=AXIS),
    "lgreco": lambda: gqsgd_jax.lgreco(rank=4, start_iter=0, axis_name=AXIS),
    "thc": lambda: gqsgd_jax.thc(levels=16, axis_name=AXIS),
    "qsgd": lambda: gqsgd_jax.qsgd(levels=7, axis_name=AXIS),
    "dgc": lambda: gqsgd_jax.dgc(density=0.01, axis_name=AXIS),
  }


def gradients(shapes=SHAPES) -> dict:
  """Per-worker gradients: every leaf with a leading worker axis."""
  rng = np.random.default_rng(0)
  return {
    name: jnp.asarray(
      rng.standard_normal((NUM_WORKERS, *shape)).astype(np.float32)
      * (0.01 if "bias" in name else 0.1)
    )
    for name, shape in shapes
  }


def make_thunk(tx, grads: dict):
  """A compiled, state-threading update step: calling it runs one step."""
  mesh = jax.make_mesh(
    (NUM_WORKERS,),
    (AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:NUM_WORKERS],
  )
  local = jax.tree.map(lambda g: g[0], grads)
  specs = gqsgd_jax.worker_state_specs(jax.eval_shape(tx.init, local))
  state = jax.jit(
    jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
  )(local)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(AXIS), specs), out_specs=(P(), specs))
  def step(g, s):
    return tx.update(jax.tree.map(lambda x: x[0], g), s)

  box = [state]

  def thunk():
    updates, box[0] = step(grads, box[0])
    return updates, box[0]

  jax.block_until_ready(thunk())  # compile and run once
  return thunk


def run(
  names: list[str], repeats: int, warmup: int, model: str = "mlp"
) -> tuple[str, dict]:
  shapes = MODELS[model]
  load_before = _common.load_average()
  grads = gradients(shapes)
  thunks = {name: make_thunk(methods()[name](), grads) for name in names}
  times = _common.median_times(thunks, repeats, warmup)
  load_after = _common.load_average()
  params = sum(int(np.prod(s)) for _, s in shapes)
  f32 = times.get("f32")
  lines = [
    BEGIN,
    "## Latest run",
    "",
    *_common.machine_lines(),
    f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
    f"- W = {NUM_WORKERS} simulated CPU devices, {model} model: {params} "
    f"parameters in {len(shapes)} leaves; median of {repeats} steps per "
    f"method after {warmup} warm-up round(s), round-robin",
    "",
    "| method | ms / step | x f32 |",
    "|---|---:|---:|",
  ]
  for name in names:
    ms = 1e3 * times[name]
    ratio = f"{times[name] / f32:.2f}" if f32 else "-"
    lines.append(f"| {name} | {ms:.2f} | {ratio} |")
  lines.append(END)
  return "\n".join(lines) + "\n", times


def write(path: str, section: str) -> None:
  """Replaces the latest-run section of ``path`` (keeps the rest)."""
  head = "# Baseline step time\n\n"
  tail = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if BEGIN in text and END in text:
      head = text[: text.index(BEGIN)]
      tail = text[text.index(END) + len(END) :].lstrip("\n")
      tail = "\n" + tail if tail else ""
    else:
      head = text.rstrip("\n") + "\n\n"
  with open(path, "w") as f:
    f.write(head + section + tail)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--methods",
    default=",".join(methods()),
    help="comma-separated subset of " + ",".join(methods()),
  )
  parser.add_argument(
    "--model",
    choices=sorted(MODELS),
    default="mlp",
    help="gradient shapes: the MLP (default) or the recommendation "
    "example's model",
  )
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  if args.repeats < 7:
    parser.error("--repeats must be >= 7")
  names = [n for n in args.methods.split(",") if n]
  unknown = sorted(set(names) - set(methods()))
  if unknown:
    parser.error(f"unknown methods {unknown}")
  if "f32" not in names:
    names.insert(0, "f32")
  section, _ = run(names, args.repeats, args.warmup, args.model)
  print(section)
  if not args.no_write:
    write(args.out, section)


if __name__ == "__main__":
  main()

"""Variance of the mean vs the number of workers W, for every reduction.

    python benchmarks/variance_vs_workers.py [--quick]

For each W in 2..256 (simulated CPU devices, one subprocess per W so that
``jax_num_cpu_devices`` can be set before the backend starts) every worker
holds a fixed heavy-tailed gradient (a common Student-t(3) part plus a
per-worker Student-t(3) part, so the true mean does not shrink with W).
Each configuration reduces it with a few dither keys and we report the
relative MSE  E||q - g_mean||^2 / ||g_mean||^2  of the mean estimate q.
Flat configurations run on a 1-D mesh of W devices; ``hierarchical`` on a
(W/8 hosts) x (8 local) mesh, W >= 16. The psum is "n/a" where its wire
format cannot serve W (it raises). Kernels: impl="xla" (the FFI kernels
are bit-identical, tested elsewhere; the twin keeps this script portable).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

import gqsgd_jax
from gqsgd_jax._src import global_quantize as gq_lib

WORKERS = (2, 4, 8, 16, 32, 64, 128, 256)
LOCAL = 8  # devices per host of the hierarchical mesh
IMPL = "xla"

# name -> keyword arguments of global_quantize (flat, axis "data").
FLAT = {
  "8-bit psum": dict(bits=8, reduction="psum"),
  "8-bit butterfly": dict(bits=8, reduction="butterfly"),
  "4-bit butterfly": dict(bits=4, reduction="butterfly"),
  "8-bit default": dict(bits=8),  # the two-shot reduction
  "4-bit default": dict(bits=4),
  "4-bit, 8-bit gather": dict(bits=4, reduction="two_shot", gather_bits=8),
  "8-bit exponential": dict(bits=8, dithering="exponential"),
}
HIER = "hierarchical 4-bit"
NAMES = (*FLAT, HIER)


def gradients(num_workers: int, dim: int, seed: int = 0) -> np.ndarray:
  """(W, dim) float32: a common heavy-tailed part plus a per-worker one."""
  rng = np.random.default_rng(seed)
  common = rng.standard_t(3, size=dim)
  own = np.random.default_rng(seed + 1 + num_workers).standard_t(
    3, size=(num_workers, dim)
  )
  return (common + own).astype(np.float32)


def relative_errors(estimates, grads) -> np.ndarray:
  """Per key ||q_k - mean||^2 / ||mean||^2; estimates (K, d), grads (W, d)."""
  mean = np.asarray(grads, np.float64).mean(0)
  err = np.asarray(estimates, np.float64) - mean
  return (err**2).sum(-1) / (mean**2).sum()


def expected_global_psum(grads, bits: int = 8) -> float:
  """Exact E||q - mean||^2 / ||mean||^2 of the 8-bit signed psum with one
  global scale: y = g s / M, stochastic rounding adds variance f (1 - f)
  (f = frac y) per worker and coordinate, independently across workers."""
  if bits != 8:
    raise ValueError(f"bits must be 8 (signed int8 psum), got {bits}")
  g = np.asarray(grads, np.float64)
  w = g.shape[0]
  levels = 127 // w
  big_m = np.abs(g).max()
  y = g * levels / big_m
  frac = y - np.floor(y)
  var = (frac * (1 - frac)).sum() * (big_m / levels) ** 2 / w**2
  return float(var / (g.mean(0) ** 2).sum())


def psum_serves(bits: int, num_workers: int) -> bool:
  try:
    gq_lib.choose_reduction("psum", bits, num_workers)
  except ValueError:
    return False
  return True


def flat_estimates(grads, configs: dict, num_keys: int) -> dict:
  """name -> (K, d) mean estimates of global_quantize(**kwargs) on a 1-D
  mesh of the first W devices; one program for all configs."""
  w = grads.shape[0]
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()[:w]),
    ("data",),
    axis_types=(jax.sharding.AxisType.Auto,),
  )
  txs = [
    gqsgd_jax.global_quantize(axis_name="data", impl=IMPL, **kw)
    for kw in configs.values()
  ]
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_keys))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
  def run(g, keys):
    def one(tx):
      return jax.vmap(
        lambda k: tx.update(g[0], gqsgd_jax.GlobalQuantizeState(k))[0]
      )(keys)

    return tuple(one(tx) for tx in txs)

  return dict(zip(configs, run(jnp.asarray(grads), keys)))


def hierarchical_estimates(grads, num_keys: int, local: int = LOCAL):
  """(K, d) estimates of hierarchical(global_quantize(bits=4)) on a
  (W / local) x local mesh."""
  w = grads.shape[0]
  axes = ("host", "local")
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()[:w]).reshape(w // local, local),
    axes,
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  tx = gqsgd_jax.hierarchical(
    gqsgd_jax.global_quantize(bits=4, axis_name="host", impl=IMPL),
    local_axis="local",
  )
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_keys))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(axes), P()), out_specs=P())
  def run(g, keys):
    return jax.vmap(
      lambda k: tx.update(
        g[0],
        gqsgd_jax.HierarchicalState(gqsgd_jax.GlobalQuantizeState(k)),
      )[0]
    )(keys)

  return run(jnp.asarray(grads), keys)


def measure(num_workers: int, dim: int, num_keys: int) -> dict:
  """name -> mean relative MSE over the keys, or None where not served."""
  grads = gradients(num_workers, dim)
  configs = {
    n: kw
    for n, kw in FLAT.items()
    if kw.get("reduction") != "psum" or psum_serves(kw["bits"], num_workers)
  }
  out: dict = dict.fromkeys(NAMES)
  for name, est in flat_estimates(grads, configs, num_keys).items():
    out[name] = float(relative_errors(est, grads).mean())
  if num_workers >= 2 * LOCAL:
    est = hierarchical_estimates(grads, num_keys)
    out[HIER] = float(relative_errors(est, grads).mean())
  return out


def _worker(num_workers: int, dim: int, num_keys: int) -> None:
  jax.config.update("jax_num_cpu_devices", num_workers)
  start = time.perf_counter()
  result = measure(num_workers, dim, num_keys)
  result["seconds"] = time.perf_counter() - start
  print(json.dumps(result))


def _plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in NAMES:
    pts = [(w, r[name]) for w, r in results.items() if r[name] is not None]
    if pts:
      # The defaults coincide with a fixed reduction: dashed, on top.
      dashed = "default" in name
      ax.plot(
        *zip(*pts),
        marker="x" if dashed else "o",
        linestyle="--" if dashed else "-",
        label=name,
      )
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("workers W")
  ax.set_ylabel("E||q - mean||² / ||mean||²")
  ax.set_title("Relative error of the mean vs W (simulated CPU devices)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="W <= 16, d = 4Ki")
  parser.add_argument("--dim", type=int, default=65536)
  parser.add_argument("--keys", type=int, default=8)
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(__file__), "results"),
    help="folder of variance_vs_workers.md / .png",
  )
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker, args.dim, args.keys)
    return
  sys.path.insert(0, os.path.dirname(__file__))
  import _common  # pylint: disable=g-import-not-at-top

  workers = [w for w in WORKERS if w <= 16] if args.quick else WORKERS
  dim = 4096 if args.quick else args.dim
  load_before = _common.load_average()
  start = time.perf_counter()
  results = {}
  for w in workers:
    proc = subprocess.run(
      [
        sys.executable,
        __file__,
        f"--worker={w}",
        f"--dim={dim}",
        f"--keys={args.keys}",
      ],
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      check=True,
    )
    results[w] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(w, results[w], flush=True)
  total = time.perf_counter() - start

  def cell(v):
    return "n/a" if v is None else f"{v:.2e}"

  lines = [
    "# Variance of the mean vs the number of workers",
    "",
    *_common.machine_lines(),
    f"- Load average before / after: {load_before} / {_common.load_average()}",
    f"- Wall time: {total:.0f} s (one subprocess per W)",
    f"- {dim} elements per worker (common + own Student-t(3) parts), "
    f"{args.keys} dither keys, impl={IMPL!r}; hierarchical on a "
    f"(W/{LOCAL}) x {LOCAL} mesh, W >= {2 * LOCAL}.",
    "",
    "Relative MSE E||q - g_mean||² / ||g_mean||² of the mean estimate q:",
    "",
    "| W | " + " | ".join(NAMES) + " |",
    "|---:|" + "---:|" * len(NAMES),
  ]
  for w, r in results.items():
    lines.append(f"| {w} | " + " | ".join(cell(r[n]) for n in NAMES) + " |")
  path = os.path.join(args.out, "variance_vs_workers")
  with open(path + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  _plot(results, path + ".png")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

"""Plots the curves of several runs' JSON logs side by side to a PNG.

  python examples/plot.py runs/*.json -o runs.png [--metrics train_loss ...]

A log (see ``common.write_log``) holds ``name`` and ``history``, a list of
records ``{"step": ..., <metric>: ...}``; records may carry different
metrics (train loss every step, test accuracy at evaluations). Each metric
gets a panel, each run a curve.
"""

import argparse
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
import numpy as np

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples import common


def metric_names(logs: list[dict]) -> list[str]:
  """Every numeric metric in the logs' histories, in order of appearance."""
  names = {}
  for log in logs:
    for record in log["history"]:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          names.setdefault(k, None)
  return list(names)


def series(log: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records of ``log`` that hold ``metric``."""
  points = [(r["step"], r[metric]) for r in log["history"] if metric in r]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps, float), np.asarray(values, float)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing running mean (per-step train metrics are noisy)."""
  if window <= 1 or len(values) < window:
    return values
  cumsum = np.cumsum(np.insert(values, 0, 0.0))
  head = cumsum[1:window] / np.arange(1, window)
  return np.concatenate([head, (cumsum[window:] - cumsum[:-window]) / window])


def plot_runs(
  logs: list[dict],
  out: str | os.PathLike,
  metrics: list[str] | None = None,
  window: int | None = None,
) -> pathlib.Path:
  """Writes one panel per metric, one curve per run, to the PNG ``out``.

  Args:
    logs: parsed JSON logs.
    out: PNG path (parent folders are created).
    metrics: metrics to plot; default: all in the logs.
    window: running-mean window; default: about 1/50 of a long series.

  Returns:
    The PNG's path.
  """
  if not logs:
    raise ValueError("no logs to plot")
  metrics = metrics or metric_names(logs)
  if not metrics:
    raise ValueError("the logs hold no metrics")
  fig, axes = plt.subplots(
    1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False
  )
  # Distinct colours for up to 20 runs (the default cycle repeats after 10).
  colors = plt.get_cmap("tab10" if len(logs) <= 10 else "tab20").colors
  for ax, metric in zip(axes[0], metrics):
    for i, log in enumerate(logs):
      steps, values = series(log, metric)
      if not len(steps):
        continue
      w = window if window is not None else max(1, len(values) // 50)
      ax.plot(
        steps,
        smooth(values, w),
        label=log.get("name", "run"),
        color=colors[i % len(colors)],
        linestyle="-" if i < len(colors) else "--",
        marker="o" if len(steps) <= 20 else None,
        markersize=3,
      )
    ax.set_title(metric.replace("_", " "))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if "loss" in metric:
      ax.set_yscale("log")
  title = {log.get("example") for log in logs} - {None}
  if len(title) == 1:
    fig.suptitle(f"{title.pop()} example")
  fig.tight_layout()
  if len(logs) <= 4:
    axes[0][0].legend()
  else:  # beside the panels, where it hides no curve
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
      handles,
      labels,
      loc="center left",
      bbox_to_anchor=(1, 0.5),
      fontsize="small",
    )
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("logs", nargs="+", help="JSON logs of runs")
  parser.add_argument("-o", "--out", default="runs.png", help="PNG to write")
  parser.add_argument("--metrics", nargs="+", help="default: all")
  parser.add_argument("--window", type=int, help="running-mean window")
  args = parser.parse_args(argv)
  logs = [common.read_log(p) for p in args.logs]
  print(plot_runs(logs, args.out, args.metrics, args.window))


if __name__ == "__main__":
  main()

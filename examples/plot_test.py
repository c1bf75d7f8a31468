"""Tests of plot.py on synthetic logs."""

import json

import numpy as np
import pytest

from examples import plot


def _log(name, steps=60, seed=0):
  rng = np.random.default_rng(seed)
  history = []
  for step in range(1, steps + 1):
    record = {"step": step, "train_loss": float(2.0 / step + rng.random())}
    if step % 20 == 0:
      record["test_accuracy"] = 1.0 - 1.0 / step
    history.append(record)
  return {"example": "vision", "name": name, "history": history}


def test_metric_names_in_order_of_appearance():
  assert plot.metric_names([_log("a")]) == ["train_loss", "test_accuracy"]


def test_series_keeps_only_records_with_the_metric():
  steps, values = plot.series(_log("a"), "test_accuracy")
  np.testing.assert_array_equal(steps, [20, 40, 60])
  np.testing.assert_allclose(values, [0.95, 0.975, 1 - 1 / 60])


def test_smooth_is_a_trailing_mean_of_the_same_length():
  got = plot.smooth(np.arange(6.0), 3)
  np.testing.assert_allclose(got, [0, 0.5, 1, 2, 3, 4])
  np.testing.assert_array_equal(plot.smooth(np.arange(2.0), 3), [0, 1])


def test_plot_runs_writes_a_png(tmp_path):
  out = plot.plot_runs(
    [_log("f32"), _log("gqsgd-4bit", seed=1)], tmp_path / "sub" / "runs.png"
  )
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reads_json_logs(tmp_path, capsys):
  paths = []
  for i, name in enumerate(["f32", "gqsgd-4bit"]):
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps(_log(name, seed=i)))
  out = tmp_path / "cli.png"
  plot.main(
    [str(p) for p in paths] + ["-o", str(out), "--metrics", "train_loss"]
  )
  assert out.stat().st_size > 0
  assert str(out) in capsys.readouterr().out


def test_no_logs_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="no logs"):
    plot.plot_runs([], tmp_path / "x.png")

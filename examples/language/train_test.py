"""Tiny end-to-end runs of the language example on 2-4 devices."""

import dataclasses
import math

import numpy as np
import pytest

from examples import common
from examples.language import train
from examples.language.configs import default
from examples.vision.train_test import _require_devices


def _tiny_config(**kwargs) -> default.Config:
  config = dataclasses.replace(
    default.get_config(),
    embed_dim=32,
    num_heads=2,
    num_layers=1,
    seq_len=16,
    batch_size=32,
    steps=40,
    warmup_steps=5,
    learning_rate=1e-2,
    eval_every=1000,
    eval_windows=64,
    progress=False,
  )
  return dataclasses.replace(config, **kwargs)


# (compressor, bits, workers); the vision tests cover the other reductions.
RUNS = [("gqsgd", 4, 4)]


@pytest.mark.parametrize(
  "compressor,bits,workers",
  RUNS,
  ids=[f"{c}-{b}bit-{w}dev" for c, b, w in RUNS],
)
def test_train_and_evaluate(tmp_path, compressor, bits, workers):
  _require_devices(workers)
  log = tmp_path / "run.json"
  config = _tiny_config(
    compressor=compressor, bits=bits, workers=workers, log=str(log)
  )
  final = train.train_and_evaluate(config)

  record = common.read_log(log)
  losses = [r["train_loss"] for r in record["history"]]
  assert len(losses) == config.steps and np.all(np.isfinite(losses))
  # From ~log(256) = 5.5 nats (uniform bytes) down to the unigram level.
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert final["test_perplexity"] == pytest.approx(math.exp(final["test_loss"]))
  assert final["test_perplexity"] < 40
  assert final["workers"] == workers and final["processes"] == 1
  assert record["example"] == "language"
  if compressor != "f32":
    # No float all-reduce of gradients behind the compressor's back.
    assert final["float_payload_bytes"] == 0


def test_pydoc_corpus_holds_out_a_tenth_of_every_topic():
  corpus = train.load_pydoc_topics()
  total = len(corpus.train) + len(corpus.test)
  assert 0.08 < len(corpus.test) / total < 0.12
  assert corpus.train.dtype == np.uint8
  # English prose: mostly lowercase letters and spaces.
  assert np.mean((corpus.train >= ord("a")) & (corpus.train <= ord("z"))) > 0.5


def test_user_text_and_windows(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("héllo world\n" * 100, encoding="utf-8")
  corpus = train.load_text(str(path))
  assert len(corpus.train) + len(corpus.test) == 13 * 100
  windows = train.eval_windows(corpus.test, 8, limit=5)
  assert windows.shape == (5, 9) and windows.dtype == np.int32
  (batch,) = next(train.batches(corpus.train, 4, 8, np.random.default_rng(0)))
  assert batch.shape == (4, 9)
  text = bytes(corpus.train.tobytes())
  for row in batch:  # real windows of the text
    assert bytes(row.astype(np.uint8).tobytes()) in text

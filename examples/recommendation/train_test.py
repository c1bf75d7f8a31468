"""Tiny end-to-end runs of the recommendation example on 2-4 devices."""

import dataclasses

import numpy as np
import pytest

from examples import common
from examples.recommendation import train
from examples.recommendation.configs import default
from examples.vision.train_test import _require_devices

_SMALL_CARDINALITIES = (
  50,
  7,
  200,
  200,
  30,
  3,
  200,
  60,
  3,
  200,
  200,
  200,
  100,
  5,
  200,
  200,
  4,
  200,
  100,
  2,
  200,
  5,
  4,
  200,
  20,
  200,
)


def _tiny_config(**kwargs) -> default.Config:
  config = dataclasses.replace(
    default.get_config(),
    cardinalities=_SMALL_CARDINALITIES,
    num_train=8192,
    num_test=2048,
    hidden=(16,),
    embed_dim=4,
    steps=40,
    batch_size=256,
    learning_rate=1e-2,
    warmup_steps=2,
    eval_every=1000,
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

  losses = [r["train_loss"] for r in common.read_log(log)["history"]]
  assert len(losses) == config.steps and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
  # Better than chance, below the hidden model's ceiling (plus noise).
  assert 0.55 < final["test_auc"] < final["oracle_auc"] + 0.02
  assert final["embedding_fraction"] > 0.7  # mostly embedding rows
  assert final["workers"] == workers
  if compressor != "f32":
    assert final["float_payload_bytes"] == 0


def test_synthetic_data_is_criteo_shaped_and_learnable():
  data = train.synthetic(_SMALL_CARDINALITIES, 4000, 1000, seed=0)
  assert data.dense_train.shape == (4000, 13)
  assert data.cat_train.shape == (4000, 26)
  assert np.all(data.cat_train < np.asarray(_SMALL_CARDINALITIES))
  assert 0.2 < data.y_train.mean() < 0.3
  assert train.scores(data.y_test, data.p_test)["auc"] > 0.7


def test_scores_match_hand_computed_auc_and_logloss():
  got = train.scores(
    np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.1, 0.6, 0.4, 0.9])
  )
  assert got["auc"] == pytest.approx(0.75)
  want = -np.mean(np.log([0.9, 0.4, 0.4, 0.9]))
  assert got["logloss"] == pytest.approx(want)


def test_load_criteo_tsv(tmp_path):
  path = tmp_path / "train.txt"
  rows = []
  for i in range(10):
    dense = ["", "3", "-1"] + [str(i)] * 10
    cats = ["", "68fd1e64"] + [f"{i:08x}"] * 24
    rows.append("\t".join([str(i % 2)] + dense + cats))
  path.write_text("\n".join(rows) + "\n")
  data = train.load_criteo_tsv(str(path), hash_buckets=100)
  assert len(data.y_train) == 9 and len(data.y_test) == 1
  assert data.cardinalities == (100,) * 26
  np.testing.assert_allclose(
    data.dense_train[0, :3], [0, np.log(4), 0], rtol=1e-6
  )
  assert np.all(data.cat_train[:, 0] == 0)  # missing
  assert np.all((data.cat_train >= 1)[:, 1:])
  assert np.all(data.cat_train < 100)
  with pytest.raises(ValueError, match="expected 40"):
    path.write_text("1\t2\n")
    train.load_criteo_tsv(str(path))

"""Default configuration: synthetic Criteo-shaped clicks on all devices."""

import dataclasses

from examples import common

# Criteo Kaggle's 26 categorical cardinalities, capped at 4000 (the hashing
# trick): mostly embedding rows, as in the real data, at a size a CPU
# trains in a minute.
CRITEO_CARDINALITIES = (
  1460,
  583,
  4000,
  4000,
  305,
  24,
  4000,
  633,
  3,
  4000,
  4000,
  4000,
  3194,
  27,
  4000,
  4000,
  10,
  4000,
  2173,
  4,
  4000,
  18,
  15,
  4000,
  105,
  4000,
)


@dataclasses.dataclass
class Config(common.RunConfig):
  """Hyperparameters and run options of the recommendation example."""

  steps: int = 400
  batch_size: int = 1024  # global examples per step, split over the workers
  learning_rate: float = 3e-3  # Adam, peak of warm-up + cosine decay
  eval_every: int = 100  # steps between test-set evaluations
  # A Criteo-format TSV (label, 13 integers, 26 hex categories per line);
  # categories are hashed into hash_buckets rows per field, the last 10%
  # of the rows held out.
  data: str | None = None
  warmup_steps: int = 20
  embed_dim: int = 8  # per field, as DeepLight's Criteo model
  hidden: tuple[int, ...] = (64, 32)  # the MLP's layers
  # Synthetic data (ignored with --data).
  cardinalities: tuple[int, ...] = CRITEO_CARDINALITIES
  num_train: int = 500_000  # more than one pass of the default run
  num_test: int = 50_000
  data_seed: int = 1234  # the hidden model and the samples
  # With --data.
  hash_buckets: int = 4000
  max_rows: int = 1_000_000


def get_config() -> Config:
  return Config()

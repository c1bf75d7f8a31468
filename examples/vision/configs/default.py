"""Default configuration: scikit-learn's digits on all devices."""

import dataclasses

from examples import common


@dataclasses.dataclass
class Config(common.RunConfig):
  """Hyperparameters and run options of the vision example."""

  steps: int = 500
  batch_size: int = 128  # global, split evenly over the workers
  learning_rate: float = 0.1  # peak of the cosine schedule
  eval_every: int = 50  # steps between test-set evaluations
  data: str | None = None  # .npz with x_train/y_train/x_test/y_test
  momentum: float = 0.9
  widths: tuple[int, ...] = (32, 64)  # channels per stage; stride 2 after 1st
  blocks_per_stage: int = 1


def get_config() -> Config:
  return Config()

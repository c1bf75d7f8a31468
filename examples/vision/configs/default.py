"""Default configuration: scikit-learn's digits on all devices."""

import dataclasses


@dataclasses.dataclass
class Config:
  """Hyperparameters and run options of the vision example."""
  compressor: str = "gqsgd"  # one of common.COMPRESSORS
  bits: int = 4  # bits per coordinate for gqsgd, thc, qsgd
  reduction: str = "auto"  # gqsgd's integer reduction: auto | psum | butterfly
  granularity: str = "bucket"  # gqsgd's max-abs scale: bucket | leaf | global
  workers: int | None = None  # data-parallel devices; None: all of them
  steps: int = 500
  batch_size: int = 128  # global, split evenly over the workers
  learning_rate: float = 0.1  # peak of the cosine schedule
  momentum: float = 0.9
  seed: int = 0  # params, data order and quantizer dither
  widths: tuple[int, ...] = (32, 64)  # channels per stage; stride 2 after 1st
  blocks_per_stage: int = 1
  eval_every: int = 50  # steps between test-set evaluations
  data: str | None = None  # .npz with x_train/y_train/x_test/y_test
  log: str | None = None  # JSON log path
  progress: bool = True  # tqdm bar


def get_config() -> Config:
  return Config()

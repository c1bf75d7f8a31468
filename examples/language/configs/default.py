"""Default configuration: CPython's pydoc topics, byte-level, all devices."""

import dataclasses

from examples import common


@dataclasses.dataclass
class Config(common.RunConfig):
  """Hyperparameters and run options of the language example."""

  steps: int = 600
  batch_size: int = 32  # global sequences per step, split over the workers
  learning_rate: float = 3e-3  # Adam, peak of warm-up + cosine decay
  eval_every: int = 100  # steps between held-out evaluations
  data: str | None = None  # a UTF-8 text file (last 10% held out)
  seq_len: int = 64  # bytes of context
  warmup_steps: int = 30
  clip_norm: float = 1.0  # of the mean gradient
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64
  mlp_ratio: int = 4
  eval_windows: int = 512  # held-out windows of seq_len (at most)


def get_config() -> Config:
  return Config()

"""Default configuration: CPython's pydoc topics, byte-level, all devices."""

import dataclasses


@dataclasses.dataclass
class Config:
  """Hyperparameters and run options of the language example."""
  compressor: str = "gqsgd"  # one of common.COMPRESSORS
  bits: int = 4  # bits per coordinate for gqsgd, thc, qsgd
  reduction: str = "auto"  # gqsgd's integer reduction: auto | psum | butterfly
  granularity: str = "bucket"  # gqsgd's max-abs scale: bucket | leaf | global
  workers: int | None = None  # data-parallel devices; None: all of them
  steps: int = 600
  batch_size: int = 32  # global sequences per step, split over the workers
  seq_len: int = 64  # bytes of context
  learning_rate: float = 3e-3  # Adam, peak of warm-up + cosine decay
  warmup_steps: int = 30
  clip_norm: float = 1.0  # of the mean gradient
  seed: int = 0  # params, data order and quantizer dither
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64
  mlp_ratio: int = 4
  eval_every: int = 100  # steps between held-out evaluations
  eval_windows: int = 512  # held-out windows of seq_len (at most)
  data: str | None = None  # a UTF-8 text file (last 10% held out)
  log: str | None = None  # JSON log path
  progress: bool = True  # tqdm bar


def get_config() -> Config:
  return Config()

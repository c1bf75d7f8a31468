"""Causal byte-level Transformer LM, trained data-parallel with a compressor.

The corpus is the documentation that ships with CPython (``pydoc_data``: the
language reference topics behind ``help()``, ~0.47 MB of English); the last
10% of every topic is held out. Bytes are the tokens (vocabulary 256),
so any text works and perplexity is per byte.
"""

import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import common
from examples.language.configs import default

VOCAB = 256  # bytes


class Block(nnx.Module):
  """Pre-norm Transformer block: causal self-attention, then a GELU MLP."""

  def __init__(
    self, dim: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs
  ):
    if dim % num_heads:
      raise ValueError(
        f"embed_dim {dim} is not a multiple of {num_heads} heads"
      )
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    y = jax.nn.dot_product_attention(
      heads(q), heads(k), heads(v), is_causal=True
    )
    x = x + self.proj(y.reshape(b, t, d))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Byte embeddings + learned positions, blocks, tied output embedding."""

  def __init__(self, config: default.Config, *, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.embed = nnx.Embed(
      VOCAB, dim, rngs=rngs, embedding_init=nnx.initializers.normal(0.02)
    )
    self.pos = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (config.seq_len, dim))
    )
    self.blocks = nnx.List(
      [
        Block(dim, config.num_heads, config.mlp_ratio, rngs=rngs)
        for _ in range(config.num_layers)
      ]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))  # logits over the 256 bytes


def _model_fields(config: default.Config) -> tuple:
  return (
    config.embed_dim,
    config.seq_len,
    config.num_layers,
    config.num_heads,
    config.mlp_ratio,
  )


# One compiled init program instead of one eager dispatch per initializer,
# cached per architecture (see the vision example).
@functools.partial(nnx.jit, static_argnums=0)
def _create(fields: tuple, key: jax.Array) -> TransformerLM:
  config = default.Config(
    **dict(
      zip(
        ("embed_dim", "seq_len", "num_layers", "num_heads", "mlp_ratio"), fields
      )
    )
  )
  return TransformerLM(config, rngs=nnx.Rngs(key))


def create_model(config: default.Config) -> TransformerLM:
  return _create(_model_fields(config), jax.random.key(config.seed))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and held-out text as uint8 byte arrays."""

  train: np.ndarray
  test: np.ndarray
  source: str


def _encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), np.uint8)


def load_pydoc_topics(test_fraction: float = 0.1) -> Corpus:
  """CPython's pydoc topics; the last ``test_fraction`` of each held out.

  Each topic is cut at the first line break after (1 - test_fraction) of
  its length, so both splits cover every topic and no line is shared.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  train, test = [], []
  for name in sorted(topics.topics):
    text = topics.topics[name]
    cut = text.find("\n", int(len(text) * (1 - test_fraction)))
    cut = len(text) if cut < 0 else cut + 1
    train.append(text[:cut])
    test.append(text[cut:])
  return Corpus(
    _encode("\n".join(train)), _encode("\n".join(test)), "pydoc_data.topics"
  )


def load_text(path: str, test_fraction: float = 0.1) -> Corpus:
  """A user-supplied UTF-8 text file; its last ``test_fraction`` held out."""
  with open(path, encoding="utf-8", errors="replace") as f:
    data = _encode(f.read())
  cut = int(len(data) * (1 - test_fraction))
  return Corpus(data[:cut], data[cut:], path)


def batches(
  text: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
):
  """Endless batches of random windows of seq_len + 1 bytes."""
  if len(text) < seq_len + 2:
    raise ValueError(f"{len(text)} bytes of text < one window of {seq_len}")
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(text) - seq_len - 1, batch_size)
    yield (text[starts[:, None] + offsets].astype(np.int32),)


def eval_windows(text: np.ndarray, seq_len: int, limit: int) -> np.ndarray:
  """Up to ``limit`` non-overlapping windows of seq_len + 1 bytes, spread
  evenly over the held-out text."""
  count = (len(text) - 1) // seq_len
  if count < 1:
    raise ValueError(f"held-out text of {len(text)} bytes < one window")
  picks = np.linspace(0, count - 1, min(count, limit)).round().astype(int)
  offsets = np.arange(seq_len + 1)
  return text[picks[:, None] * seq_len + offsets].astype(np.int32)


def _nll(graphdef, params, windows):
  logits = nnx.merge(graphdef, params)(windows[:, :-1])
  targets = windows[:, 1:]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll, jnp.argmax(logits, -1) == targets


def loss_fn(graphdef, params, batch):
  """Mean next-byte cross-entropy (nats) of one shard, and its accuracy."""
  nll, correct = _nll(graphdef, params, batch[0])
  return nll.mean(), {"accuracy": correct.mean()}


def eval_sums(graphdef, params, batch):
  """Summed NLL, correct bytes and byte count of one (padded) shard."""
  windows, weight = batch
  nll, correct = _nll(graphdef, params, windows)
  w = weight[:, None]
  return {
    "nll": jnp.sum(nll * w),
    "correct": jnp.sum(correct * w),
    "count": jnp.sum(jnp.broadcast_to(w, nll.shape)),
  }


def evaluate(eval_step, params, windows, mesh) -> dict:
  """Held-out loss (nats/byte), perplexity, bits per byte, accuracy."""
  (windows,), weight = common.pad_rows((windows,), mesh.devices.size)
  sums = common.to_host(
    eval_step(params, common.shard((windows, weight), mesh))
  )
  sums = {k: float(np.sum(v)) for k, v in sums.items()}
  loss = sums["nll"] / sums["count"]
  return {
    "test_loss": loss,
    "test_perplexity": math.exp(loss),
    "test_bits_per_byte": loss / math.log(2),
    "test_accuracy": sums["correct"] / sums["count"],
  }


def make_optimizer(config: default.Config) -> optax.GradientTransformation:
  """The compressor, global-norm clipping, then Adam (warm-up + cosine)."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    min(config.warmup_steps, config.steps - 1),
    config.steps,
  )
  return common.make_optimizer(
    config.compressor,
    config.bits,
    "adam",
    schedule,
    seed=config.seed,
    reduction=config.reduction,
    granularity=config.granularity,
    clip_norm=config.clip_norm,
  )


def make_task(config: default.Config) -> common.Task:
  """The LM on the pydoc topics (or ``config.data``), for common's loop."""
  corpus = load_text(config.data) if config.data else load_pydoc_topics()
  held_out = eval_windows(corpus.test, config.seq_len, config.eval_windows)
  graphdef, params = nnx.split(create_model(config), nnx.Param)
  rng = np.random.default_rng(config.seed)
  return common.Task(
    params=params,
    optimizer=make_optimizer(config),
    loss_fn=lambda p, b: loss_fn(graphdef, p, b),
    eval_fn=lambda p, b: eval_sums(graphdef, p, b),
    batches=batches(corpus.train, config.batch_size, config.seq_len, rng),
    evaluate=lambda step, p, mesh: evaluate(step, p, held_out, mesh),
    extra=lambda p: dict(
      corpus=corpus.source,
      train_bytes=len(corpus.train),
      held_out_bytes=len(corpus.test),
      eval_bytes=held_out.shape[0] * config.seq_len,
    ),
  )


def train_and_evaluate(config: default.Config) -> dict:
  """Trains the LM and returns its final metrics and wire bytes.

  Writes the JSON log (config, wire bytes, history, final metrics) to
  ``config.log`` if set (process 0 of a multi-process run).
  """
  return common.train_and_evaluate("language", config, make_task)

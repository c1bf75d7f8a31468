"""DeepFwFM click-through-rate model, trained data-parallel with a compressor.

The model follows DeepLight's (Deng et al., 2021) DeepFwFM for Criteo: every
one of the 39 fields (13 dense, 26 categorical) has an embedding vector (a
row of its field's table; a dense field scales its single vector by the
value) and a first-order weight; the logit adds a bias, the first-order
terms, the field-weighted factorization machine sum_{i<j} r_ij <e_i, e_j>
and an MLP over the concatenated embeddings. As there, nearly all
parameters are embedding rows.

Without --data the clicks come from a fixed hidden model of the same family
(its own embeddings, first-order weights, dense weights and sparse field
pair strengths) on Zipf-distributed categories, so AUC is meaningful and the
hidden model's own AUC is the ceiling.
"""

import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as sk_metrics

from examples import common
from examples.recommendation.configs import default

NUM_DENSE = 13
NUM_CATEGORICAL = 26


class DeepFwFM(nnx.Module):
  """Bias + first order + FwFM interactions + MLP, all from field embeddings.

  The 26 categorical fields' tables are stored as one table with a row
  offset per field (as fused embedding collections do): the same model as
  one table per field, with one gather instead of 26.
  """

  def __init__(
    self,
    cardinalities: tuple[int, ...],
    num_dense: int,
    embed_dim: int,
    hidden: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(0.01)
    self.offsets = tuple(
      int(o) for o in np.cumsum((0,) + tuple(cardinalities[:-1]))
    )  # static: part of the graph, not a param
    rows = int(sum(cardinalities))
    self.embeddings = nnx.Embed(rows, embed_dim, embedding_init=init, rngs=rngs)
    self.first_order = nnx.Embed(
      rows, 1, embedding_init=nnx.initializers.zeros, rngs=rngs
    )
    self.dense_embed = nnx.Param(init(rngs.params(), (num_dense, embed_dim)))
    self.dense_first_order = nnx.Param(jnp.zeros((num_dense,)))
    num_fields = num_dense + len(cardinalities)
    # r_ij of the FwFM; only i < j is used.
    self.field_weights = nnx.Param(
      nnx.initializers.normal(1 / math.sqrt(num_fields))(
        rngs.params(), (num_fields, num_fields)
      )
    )
    self.bias = nnx.Param(jnp.zeros((1,)))
    sizes = (num_fields * embed_dim,) + tuple(hidden)
    self.mlp = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])]
    )
    self.mlp_out = nnx.Linear(sizes[-1], 1, rngs=rngs)

  def __call__(self, dense, categorical):
    """Logits [B] of dense float [B, 13] and categorical int [B, 26]."""
    rows = categorical + jnp.asarray(self.offsets, jnp.int32)
    e = jnp.concatenate(
      [dense[:, :, None] * self.dense_embed[None], self.embeddings(rows)],
      axis=1,
    )  # [B, F, k]
    first = jnp.sum(dense * self.dense_first_order, -1) + jnp.sum(
      self.first_order(rows)[..., 0], -1
    )
    gram = jnp.einsum("bik,bjk->bij", e, e)
    pairs = jnp.triu(self.field_weights[...], k=1)
    fwfm = jnp.einsum("bij,ij->b", gram, pairs)
    h = e.reshape(e.shape[0], -1)
    for layer in self.mlp:
      h = nnx.relu(layer(h))
    return self.bias[0] + first + fwfm + self.mlp_out(h)[:, 0]


@functools.partial(nnx.jit, static_argnums=(0, 1, 2, 3))
def _create(cardinalities, num_dense, embed_dim, hidden, key) -> DeepFwFM:
  return DeepFwFM(
    cardinalities, num_dense, embed_dim, hidden, rngs=nnx.Rngs(key)
  )


def create_model(cardinalities, config: default.Config) -> DeepFwFM:
  return _create(
    tuple(cardinalities),
    NUM_DENSE,
    config.embed_dim,
    tuple(config.hidden),
    jax.random.key(config.seed),
  )


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Dense features (log1p of counts) float32, categories int32 (0 is
  "missing"), labels float32 in {0, 1}; optionally the hidden model's click
  probability of each test example."""

  dense_train: np.ndarray
  cat_train: np.ndarray
  y_train: np.ndarray
  dense_test: np.ndarray
  cat_test: np.ndarray
  y_test: np.ndarray
  cardinalities: tuple[int, ...]
  p_test: np.ndarray | None = None
  source: str = "synthetic"


def _zipf(rng, cardinality: int, size: int, exponent: float) -> np.ndarray:
  p = 1.0 / np.arange(1, cardinality + 1) ** exponent
  return rng.choice(cardinality, size=size, p=p / p.sum()).astype(np.int32)


@functools.lru_cache(maxsize=2)  # the convergence script trains many times
def synthetic(
  cardinalities=default.CRITEO_CARDINALITIES,
  num_train: int = 500_000,
  num_test: int = 50_000,
  seed: int = 1234,
  hidden_dim: int = 4,
  click_rate: float = 0.25,
) -> Dataset:
  """Criteo-shaped clicks drawn from a fixed hidden FwFM-style model.

  Categories are Zipf-distributed (a few values dominate each field, a long
  tail is rare, as in Criteo); dense features are log-normal counts. The
  logit is a first-order part (std ~0.8), a dense part (std ~0.5) and a
  field-pair part sum r_ij <u_i, u_j> over a random third of the pairs (std
  ~1), shifted so about ``click_rate`` of the examples are clicks.
  """
  rng = np.random.default_rng(seed)
  n = num_train + num_test
  fields = len(cardinalities)
  cat = np.stack(
    [_zipf(rng, c, n, rng.uniform(0.9, 1.3)) for c in cardinalities], axis=1
  )
  counts = np.floor(
    np.exp(
      rng.normal(
        rng.uniform(0, 3, NUM_DENSE),
        rng.uniform(0.5, 1.5, NUM_DENSE),
        (n, NUM_DENSE),
      )
    )
  )
  dense = np.log1p(counts).astype(np.float32)

  u = [
    rng.normal(0, 1, (c, hidden_dim)).astype(np.float32) for c in cardinalities
  ]
  w = [rng.normal(0, 1, c) for c in cardinalities]
  pairs = np.triu(
    rng.normal(0, 1, (fields, fields)) * (rng.random((fields, fields)) < 1 / 3),
    1,
  ).astype(np.float32)
  first = sum(w[f][cat[:, f]] for f in range(fields))
  zdense = (dense - dense.mean(0)) / (dense.std(0) + 1e-6)
  dense_part = zdense @ rng.normal(0, 1, NUM_DENSE)
  inter = np.zeros(n, np.float32)
  for i in range(0, n, 2**16):  # [rows, fields, hidden_dim] a chunk at a time
    emb = np.stack([u[f][cat[i : i + 2**16, f]] for f in range(fields)], 1)
    inter[i : i + 2**16] = np.sum(emb * (pairs @ emb), axis=(1, 2))
  std = lambda x: x / (x.std() + 1e-12)
  logit = 0.8 * std(first) + 0.5 * std(dense_part) + std(inter)
  # The bias that gives the target click rate (bisection on the mean).
  lo, hi = -10.0, 10.0
  for _ in range(50):
    mid = (lo + hi) / 2
    if np.mean(1 / (1 + np.exp(-(logit + mid)))) > click_rate:
      hi = mid
    else:
      lo = mid
  p = 1 / (1 + np.exp(-(logit + lo)))
  y = (rng.random(n) < p).astype(np.float32)
  t = num_train
  return Dataset(
    dense[:t],
    cat[:t],
    y[:t],
    dense[t:],
    cat[t:],
    y[t:],
    tuple(int(c) for c in cardinalities),
    p[t:].astype(np.float32),
  )


def load_criteo_tsv(
  path: str,
  hash_buckets: int = 4000,
  max_rows: int | None = None,
  test_fraction: float = 0.1,
) -> Dataset:
  """A Criteo-format TSV: label, 13 integer and 26 hex categorical fields.

  Missing integers are 0 and negative ones are clipped to 0, then log1p;
  categories are hashed into ``hash_buckets`` rows per field (row 0 for
  missing). The last ``test_fraction`` of the rows (Criteo is in time
  order) is the test set.
  """
  labels, dense, cat = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if max_rows is not None and len(labels) >= max_rows:
        break
      parts = line.rstrip("\n").split("\t")
      if len(parts) != 1 + NUM_DENSE + NUM_CATEGORICAL:
        raise ValueError(
          f"{path}:{len(labels) + 1}: expected "
          f"{1 + NUM_DENSE + NUM_CATEGORICAL} tab-separated "
          f"fields, got {len(parts)}"
        )
      labels.append(float(parts[0]))
      dense.append(
        [max(int(x), 0) if x else 0 for x in parts[1 : 1 + NUM_DENSE]]
      )
      cat.append(
        [
          int(x, 16) % (hash_buckets - 1) + 1 if x else 0
          for x in parts[1 + NUM_DENSE :]
        ]
      )
  if len(labels) < 2:
    raise ValueError(f"{path}: fewer than two rows")
  y = np.asarray(labels, np.float32)
  x = np.log1p(np.asarray(dense, np.float64)).astype(np.float32)
  c = np.asarray(cat, np.int32)
  t = min(len(y) - 1, max(1, int(round(len(y) * (1 - test_fraction)))))
  return Dataset(
    x[:t],
    c[:t],
    y[:t],
    x[t:],
    c[t:],
    y[t:],
    (hash_buckets,) * NUM_CATEGORICAL,
    source=path,
  )


def batches(data: Dataset, batch_size: int, rng: np.random.Generator):
  """Endless shuffled minibatches (a fresh permutation every epoch)."""
  n = len(data.y_train)
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} > {n} training examples")
  while True:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start : start + batch_size]
      yield data.dense_train[idx], data.cat_train[idx], data.y_train[idx]


def loss_fn(graphdef, params, batch):
  """Mean log-loss of one shard and its accuracy at threshold 0.5."""
  dense, cat, y = batch
  logits = nnx.merge(graphdef, params)(dense, cat)
  loss = optax.sigmoid_binary_cross_entropy(logits, y).mean()
  return loss, {"accuracy": jnp.mean((logits > 0) == (y > 0.5))}


def predict(graphdef, params, batch):
  """Per-example logits of one (padded) shard."""
  dense, cat = batch
  return {"logits": nnx.merge(graphdef, params)(dense, cat)}


def scores(y: np.ndarray, p: np.ndarray) -> dict:
  """AUC and mean log-loss of click probabilities ``p`` for labels ``y``."""
  p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
  logloss = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
  return {
    "auc": float(sk_metrics.roc_auc_score(y, p)),
    "logloss": float(logloss),
  }


def evaluate(eval_step, params, data: Dataset, mesh) -> dict:
  """Test AUC and log-loss (the test set padded to a multiple of W)."""
  n = len(data.y_test)
  (dense, cat), _ = common.pad_rows(
    (data.dense_test, data.cat_test), mesh.devices.size
  )
  logits = common.to_host(eval_step(params, common.shard((dense, cat), mesh)))[
    "logits"
  ][:n]
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  return {f"test_{k}": v for k, v in scores(data.y_test, p).items()}


def make_optimizer(config: default.Config) -> optax.GradientTransformation:
  """The compressor, then Adam (warm-up + cosine), as DeepLight's Adam."""
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
  )


def load_data(config: default.Config) -> Dataset:
  if config.data:
    return load_criteo_tsv(config.data, config.hash_buckets, config.max_rows)
  return synthetic(
    config.cardinalities, config.num_train, config.num_test, config.data_seed
  )


def make_task(config: default.Config) -> common.Task:
  """The DeepFwFM on synthetic clicks (or ``config.data``), for common's
  loop."""
  data = load_data(config)
  model = create_model(data.cardinalities, config)
  graphdef, params = nnx.split(model, nnx.Param)
  embedding_params = (
    model.embeddings.embedding.size + model.first_order.embedding.size
  )

  def extra(params) -> dict:
    out = dict(
      embedding_fraction=embedding_params / common.num_elements(params),
      click_rate=float(np.mean(data.y_train)),
      data_source=data.source,
    )
    if data.p_test is not None:  # the hidden model's scores: the ceiling
      out.update(
        {f"oracle_{k}": v for k, v in scores(data.y_test, data.p_test).items()}
      )
    return out

  rng = np.random.default_rng(config.seed)
  return common.Task(
    params=params,
    optimizer=make_optimizer(config),
    loss_fn=lambda p, b: loss_fn(graphdef, p, b),
    eval_fn=lambda p, b: predict(graphdef, p, b),
    batches=batches(data, config.batch_size, rng),
    evaluate=lambda step, p, mesh: evaluate(step, p, data, mesh),
    extra=extra,
  )


def train_and_evaluate(config: default.Config) -> dict:
  """Trains the DeepFwFM and returns its final metrics and wire bytes.

  Writes the JSON log (config, wire bytes, history, final metrics) to
  ``config.log`` if set (process 0 of a multi-process run).
  """
  return common.train_and_evaluate("recommendation", config, make_task)

"""Small ResNet on images, trained data-parallel with a gradient compressor."""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import model_selection

from examples import common
from examples.vision.configs import default


class ResidualBlock(nnx.Module):
  """conv-norm-relu-conv-norm plus a (projected) shortcut, then relu."""

  def __init__(
    self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs
  ):
    conv = dict(kernel_size=(3, 3), use_bias=False, rngs=rngs)
    self.conv1 = nnx.Conv(in_features, out_features, strides=stride, **conv)
    self.norm1 = _norm(out_features, rngs)
    self.conv2 = nnx.Conv(out_features, out_features, **conv)
    # Zero-initialised last scale: each block starts as the identity, which
    # lets plain SGD train the ResNet from the first step.
    self.norm2 = _norm(out_features, rngs, scale_init=nnx.initializers.zeros)
    if stride != 1 or in_features != out_features:
      self.shortcut = nnx.Conv(
        in_features,
        out_features,
        kernel_size=(1, 1),
        strides=stride,
        use_bias=False,
        rngs=rngs,
      )
    else:
      self.shortcut = None

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    skip = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(y + skip)


def _norm(features: int, rngs: nnx.Rngs, **kwargs) -> nnx.GroupNorm:
  # GroupNorm, not BatchNorm: it keeps no batch statistics, so every device
  # holds only params, and they stay identical without any extra collective.
  return nnx.GroupNorm(
    features, num_groups=min(8, features), rngs=rngs, **kwargs
  )


class ResNet(nnx.Module):
  """Stem, stages of residual blocks (stride 2 between stages), linear head."""

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    widths=(32, 64),
    blocks_per_stage: int = 1,
    *,
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(
      in_channels, widths[0], kernel_size=(3, 3), use_bias=False, rngs=rngs
    )
    self.stem_norm = _norm(widths[0], rngs)
    blocks = []
    features = widths[0]
    for i, width in enumerate(widths):
      for j in range(blocks_per_stage):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(ResidualBlock(features, width, stride, rngs=rngs))
        features = width
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))  # global average pooling


# One compiled init program instead of one eager dispatch per initializer
# (each a compile of threefry, ~1-2 s on a small CPU), and a module-level
# function so later runs in the same process reuse it.
@functools.partial(nnx.jit, static_argnums=(0, 1, 2, 3))
def create_model(
  in_channels: int,
  num_classes: int,
  widths: tuple[int, ...],
  blocks_per_stage: int,
  key: jax.Array,
) -> ResNet:
  return ResNet(
    in_channels, num_classes, widths, blocks_per_stage, rngs=nnx.Rngs(key)
  )


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images in [0, 1] as float32 NHWC, labels as int32."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits(seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images), 80/20 stratified."""
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    x, y, test_size=0.2, stratify=y, random_state=seed
  )
  return Dataset(x_train, y_train, x_test, y_test)


def load_npz(path: str) -> Dataset:
  """A user-supplied .npz (e.g. MNIST [N,28,28] or CIFAR [N,32,32,3])."""
  with np.load(path) as f:
    arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}

  def images(x):
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale without a channel axis
      x = x[..., None]
    scale = 255.0 if x.dtype == np.uint8 or x.max() > 1.0 else 1.0
    return (x / scale).astype(np.float32)

  return Dataset(
    images(arrays["x_train"]),
    arrays["y_train"].reshape(-1).astype(np.int32),
    images(arrays["x_test"]),
    arrays["y_test"].reshape(-1).astype(np.int32),
  )


def batches(x, y, batch_size: int, rng: np.random.Generator):
  """Endless shuffled minibatches (a fresh permutation every epoch)."""
  if batch_size > len(x):
    raise ValueError(f"batch_size {batch_size} > {len(x)} training examples")
  while True:
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
      idx = order[start : start + batch_size]
      yield x[idx], y[idx]


def loss_fn(graphdef, params, batch):
  """Mean cross-entropy of one shard and its accuracy."""
  x, y = batch
  logits = nnx.merge(graphdef, params)(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def eval_sums(graphdef, params, batch):
  """Summed loss, correct count and example count of one (padded) shard."""
  x, y, weight = batch
  logits = nnx.merge(graphdef, params)(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  return {
    "loss": jnp.sum(loss * weight),
    "correct": jnp.sum(correct * weight),
    "count": jnp.sum(weight),
  }


def evaluate(eval_step, params, x, y, mesh) -> dict:
  """Test loss and accuracy, the test set padded to a multiple of W."""
  (x, y), weight = common.pad_rows((x, y), mesh.devices.size)
  sums = common.to_host(eval_step(params, common.shard((x, y, weight), mesh)))
  sums = {k: float(np.sum(v)) for k, v in sums.items()}
  return {
    "test_loss": sums["loss"] / sums["count"],
    "test_accuracy": sums["correct"] / sums["count"],
  }


def make_optimizer(config: default.Config) -> optax.GradientTransformation:
  """The compressor first (local -> mean gradient), then SGD with momentum."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
  return common.make_optimizer(
    config.compressor,
    config.bits,
    "sgd",
    schedule,
    momentum=config.momentum,
    seed=config.seed,
    reduction=config.reduction,
    granularity=config.granularity,
  )


def make_task(config: default.Config) -> common.Task:
  """The ResNet on the digits (or ``config.data``), for common's loop."""
  # The digits split is fixed, so runs with different seeds share a test set.
  data = load_npz(config.data) if config.data else load_digits()
  model = create_model(
    data.x_train.shape[-1],
    data.num_classes,
    tuple(config.widths),
    config.blocks_per_stage,
    jax.random.key(config.seed),
  )
  # Pure pytrees for the jitted shard_map step: the graph structure stays
  # on the host, the params (the model's only state) travel as a State, and
  # the optimizer state is optax's own (see common.make_train_step for why
  # not nnx.Optimizer).
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(config.seed)
  return common.Task(
    params=params,
    optimizer=make_optimizer(config),
    loss_fn=lambda p, b: loss_fn(graphdef, p, b),
    eval_fn=lambda p, b: eval_sums(graphdef, p, b),
    batches=batches(data.x_train, data.y_train, config.batch_size, rng),
    evaluate=lambda step, p, mesh: evaluate(
      step, p, data.x_test, data.y_test, mesh
    ),
  )


def train_and_evaluate(config: default.Config) -> dict:
  """Trains the ResNet and returns its final metrics and wire bytes.

  Writes the JSON log (config, wire bytes, history, final metrics) to
  ``config.log`` if set (process 0 of a multi-process run).
  """
  return common.train_and_evaluate("vision", config, make_task)

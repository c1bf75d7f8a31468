"""Helpers for the stateful (error-feedback) low-rank compressor tests.

``_utils.sharded_update`` passes the optimizer state replicated (``P()``);
PowerSGD, ACP-SGD and L-GreCo keep a residual per worker, so here the state
travels with ``gqsgd_jax.worker_state_specs`` under shard_map (and stacked
per device under pmap), and every step also returns each worker's copy of
the updates and of the state, for bitwise replica checks.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from gqsgd_jax._src.worker_state import worker_state_specs

from _utils import data_mesh
from _utils import mlp_step


class Runner:
  """Compiles ``tx`` once for W workers and steps it on stacked gradients.

  ``step(stacked_grads)`` takes a pytree whose leaves have a leading worker
  axis and returns ``(per_worker_updates, per_worker_state)``: numpy trees
  with a leading worker axis holding what every device computed.
  """

  def __init__(self, tx, params, num_workers: int, mode: str = "shard_map"):
    self.tx = tx
    self.mode = mode
    self.num_workers = num_workers
    self.traces = 0
    mesh = data_mesh(num_workers)
    devices = list(mesh.devices.flat)
    shapes = jax.eval_shape(tx.init, params)

    def update(g, s):
      self.traces += 1  # runs once per compilation
      return tx.update(g, s)

    if mode == "shard_map":
      specs = worker_state_specs(shapes, "data")
      self.state = jax.jit(
        jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
      )(params)

      @jax.jit
      @jax.shard_map(
        mesh=mesh,
        in_specs=(P("data"), specs),
        out_specs=(P(), P("data"), specs, P("data")),
      )
      def step(g, s):
        u, s = update(jax.tree.map(lambda x: x[0], g), s)
        # out_specs P() type-checks that updates are replicated.
        copy = lambda t: jax.tree.map(lambda x: x[None], t)
        return u, copy(u), s, copy(s)

      def run(g):
        _, per_worker, self.state, states = step(g, self.state)
        return per_worker, states
    elif mode == "pmap":
      init = jax.pmap(
        lambda _: tx.init(params), axis_name="data", devices=devices
      )
      self.state = init(jnp.arange(num_workers))
      step = jax.pmap(update, axis_name="data", devices=devices)

      def run(g):
        per_worker, self.state = step(g, self.state)
        return per_worker, self.state
    else:
      raise ValueError(mode)
    self._run = run

  def warm_up(self, stacked_grads) -> None:
    """Compiles the step (on a throw-away copy of the state)."""
    state = self.state
    jax.block_until_ready(self._run(stacked_grads))
    self.state = state

  def step(self, stacked_grads):
    out, states = jax.block_until_ready(self._run(stacked_grads))
    return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, states)


def stacked(rng, shapes: dict, num_workers: int, scale=1.0) -> dict:
  """Random per-worker gradients {name: f32[W, *shape]}."""
  return {
    k: (scale * rng.standard_normal((num_workers,) + s)).astype(np.float32)
    for k, s in shapes.items()
  }


def zeros_like_params(shapes: dict) -> dict:
  return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


def low_rank_steps(shapes, compressed, seed, num_workers, rank):
  """Per-worker gradients, full rank each, whose mean has rank <= ``rank``.

  Each layer's mean stays in fixed rank-r column and row spaces with new
  coefficients every step (as warm start assumes), with singular values 1..2
  times the noise's entry scale: well-conditioned, so "exact" means fp32.
  """
  rng = np.random.default_rng(seed)
  bases = {}
  for name in compressed:
    shape = shapes[name]
    n, m = shape[0], int(np.prod(shape[1:]))
    bases[name] = (
      np.linalg.qr(rng.standard_normal((n, rank)))[0],
      np.linalg.qr(rng.standard_normal((m, rank)))[0],
    )
  while True:
    out = {}
    for name, shape in shapes.items():
      g = rng.standard_normal((num_workers,) + shape).astype(np.float32)
      if name in compressed:
        u, v = bases[name]
        rot = [
          np.linalg.qr(rng.standard_normal((rank, rank)))[0] for _ in range(2)
        ]
        sv = np.linspace(2, 1, rank) * math.sqrt(g[0].size / rank)
        low = (u @ rot[0] * sv) @ (v @ rot[1]).T
        g = g - g.mean(axis=0, keepdims=True)  # zero-mean noise
        g = g + low.reshape(shape).astype(np.float32)
      out[name] = g
    yield out


def compiled_flax_step(compressor, workers=8):
  """A compiled Flax/optax data-parallel step under shard_map (shapes only).

  The MLP has kernels 64 x 256 and 256 x 10 and biases of 256 and 10.
  """
  return mlp_step(compressor, workers, abstract=True)[0]


# -----------------------------------------------------------------------------
# A float64 NumPy model of PowerSGD, the oracle of the tests.


def np_orthogonalize(a: np.ndarray, epsilon: float) -> np.ndarray:
  """Gram-Schmidt for r <= 2 (as the reference), reduced QR otherwise."""
  a = np.array(a, np.float64)
  if a.shape[1] > 2:
    return np.linalg.qr(a)[0]
  for k in range(a.shape[1]):
    a[:, k] /= np.linalg.norm(a[:, k]) + epsilon
    for j in range(k + 1, a.shape[1]):
      a[:, j] -= (a[:, k] @ a[:, j]) * a[:, k]
  return a


def np_power_round(xs: np.ndarray, q: np.ndarray, epsilon: float):
  """One round on per-worker matrices xs [W, n, m]: (P Q^T, averaged Q)."""
  q = np_orthogonalize(q, epsilon)
  p = np_orthogonalize(sum(x @ q for x in xs), epsilon)
  new_q = sum(x.T @ p for x in xs) / len(xs)
  return p @ new_q.T, new_q


class PowerSGDReference:
  """Multi-step float64 PowerSGD on {name: array} gradients (EF, warm start).

  ``compressed`` maps the names of compressed leaves to their initial Q;
  the others are averaged exactly.
  """

  def __init__(
    self, compressed: dict, *, start_iter: int, epsilon: float, num_workers: int
  ):
    self.q = {n: np.asarray(q, np.float64) for n, q in compressed.items()}
    self.start_iter = start_iter
    self.epsilon = epsilon
    self.error = [dict() for _ in range(num_workers)]
    self.count = 0

  def step(self, local: dict) -> dict:
    """local: {name: [W, *shape]} -> the mean estimate {name: shape}."""
    self.count += 1
    if self.count <= self.start_iter:
      return {
        n: np.mean(g.astype(np.float64), axis=0) for n, g in local.items()
      }
    out = {}
    xs = {
      n: np.stack(
        [
          g[w].astype(np.float64) + self.error[w].get(n, 0.0)
          for w in range(len(g))
        ]
      )
      for n, g in local.items()
    }
    for n, x in xs.items():
      if n in self.q:
        shape = x.shape[1:]
        mats = x.reshape(len(x), shape[0], -1)
        approx, self.q[n] = np_power_round(mats, self.q[n], self.epsilon)
        out[n] = approx.reshape(shape)
      else:
        out[n] = x.mean(axis=0)
      for w in range(len(x)):
        self.error[w][n] = x[w] - out[n]
    return out

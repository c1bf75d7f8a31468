"""A few hierarchical 4-bit SGD steps on a ("host", "local") mesh.

Shared by the multi-process worker (tests/mp_worker.py --hierarchical, one
process per host) and the single-process check in distributed_test.py, so
both run the same program on the same data.
"""

import hashlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import gqsgd_jax

AXES = ("host", "local")
DIM = 32


def host_mesh(devices, hosts: int):
  """Devices ordered by process, one row per host."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.array(devices).reshape(hosts, len(devices) // hosts)
  return jax.sharding.Mesh(
    grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def device_data(index: int):
  """Least-squares data of the device at global mesh position ``index``."""
  rng = np.random.default_rng(2000 + index)
  a = rng.normal(size=(16, DIM)).astype(np.float32)
  return a, (a @ np.ones(DIM, np.float32)).astype(np.float32)


def train(mesh, a, b, steps: int) -> str:
  """SHA-256 of the parameters after ``steps`` steps; a, b: global arrays
  with a leading device axis, sharded over both mesh axes."""
  tx = optax.chain(
    gqsgd_jax.hierarchical(
      gqsgd_jax.global_quantize(bits=4, axis_name="host"), local_axis="local"
    ),
    optax.sgd(0.1),
  )

  def loss(x, a, b):
    return 0.5 * jnp.mean((a @ x - b) ** 2)

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P(), P(), P(AXES), P(AXES)), out_specs=(P(), P())
  )
  def step(x, state, a, b):
    grad = jax.grad(loss)(gqsgd_jax.varying(x, AXES), a[0], b[0])
    updates, state = tx.update(grad, state, x)
    return optax.apply_updates(x, updates), state

  replicated = NamedSharding(mesh, P())
  params = jax.device_put(jnp.zeros(DIM), replicated)
  state = jax.device_put(tx.init(jnp.zeros(DIM)), replicated)
  for _ in range(steps):
    params, state = step(params, state, a, b)
  final = np.asarray(params.addressable_shards[0].data)
  return hashlib.sha256(final.tobytes()).hexdigest()

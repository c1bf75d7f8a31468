"""Worker of the multi-process tests: a few compressed SGD steps.

Run under gqsgd_jax.launch; prints a digest of the final parameters. With
--die-at STEP, process --die-rank exits abruptly at that step (fault test).
"""

import argparse
import hashlib
import os

import gqsgd_jax

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--die-at", type=int, default=-1)
parser.add_argument("--die-rank", type=int, default=-1)
parser.add_argument(
  "--hierarchical",
  action="store_true",
  help="hierarchical 4-bit on a (host, local) mesh",
)
parser.add_argument(
  "--hosts",
  type=int,
  default=0,
  help="host rows of that mesh (default: one per process)",
)
args = parser.parse_args()

gqsgd_jax.initialize_distributed()

if args.hierarchical:  # one "host" per process (tests/_hierarchical_step.py)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import _hierarchical_step as hs  # pylint: disable=g-import-not-at-top

  mesh = hs.host_mesh(jax.devices(), args.hosts or jax.process_count())
  n = jax.local_device_count()
  first = jax.process_index() * n
  data = [hs.device_data(first + k) for k in range(n)]
  sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(hs.AXES))
  a, b = (
    jax.make_array_from_process_local_data(
      sharding, np.stack([d[i] for d in data])
    )
    for i in (0, 1)
  )
  print(
    "DIGEST",
    hs.train(mesh, a, b, args.steps),
    "devices",
    jax.device_count(),
    flush=True,
  )
  raise SystemExit(0)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

mesh = jax.make_mesh(
  (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
)
tx = optax.chain(gqsgd_jax.global_quantize(bits=4), optax.sgd(0.1))
d = 32
params = jnp.zeros(d)
opt_state = tx.init(params)


def loss(x, a, b):
  return 0.5 * jnp.mean((a @ x - b) ** 2)


@jax.jit
@jax.shard_map(
  mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
)
def step(x, state, a, b):
  grad = jax.grad(loss)(gqsgd_jax.varying(x, "data"), a[0], b[0])
  updates, state = tx.update(grad, state, x)
  return optax.apply_updates(x, updates), state


# Each device holds its own data shard, drawn from its global index.
rank = jax.process_index()
local = jax.local_device_count()
rng = np.random.default_rng(1000 + rank)
a_local = rng.normal(size=(local, 16, d)).astype(np.float32)
b_local = (a_local @ np.ones(d, np.float32)).astype(np.float32)
sharding = jax.sharding.NamedSharding(mesh, P("data"))
a = jax.make_array_from_process_local_data(sharding, a_local)
b = jax.make_array_from_process_local_data(sharding, b_local)
for i in range(args.steps):
  if i == args.die_at and rank == args.die_rank:
    print(f"rank {rank} dies at step {i}", flush=True)
    os._exit(17)
  params, opt_state = step(params, opt_state, a, b)
  params.block_until_ready()
final = np.asarray(params.addressable_shards[0].data)
print(
  "DIGEST",
  hashlib.sha256(final.tobytes()).hexdigest(),
  "devices",
  jax.device_count(),
  flush=True,
)

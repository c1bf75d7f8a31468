"""PRNG conventions shared by the transforms.

* Per-worker randomness (dither): fold the worker index into the key.
* Shared randomness (initial Q, Hadamard signs): the same key everywhere.
* Keys live in optimizer state as raw uint32[2] data, so states checkpoint
  and compare like any array.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src.collectives import AxisName


def canonical_key(key: jax.typing.ArrayLike, name: str = "key") -> jax.Array:
  """An int seed or PRNG key (typed or raw) as raw uint32[2] key data."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.PRNGKey(int(key))
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(
      f"{name} must be an int seed or a PRNG key, got {key.dtype}"
      f"{list(key.shape)}"
    )
  return key


def fold(key: jax.Array, *data: int | jax.Array) -> jax.Array:
  """fold_in of each datum in turn (ints or traced int32 scalars)."""
  for d in data:
    key = jax.random.fold_in(key, d)
  return key


def worker_key(
  key: jax.Array, axis_name: AxisName, *data: int | jax.Array
) -> jax.Array:
  """A key independent per worker on ``axis_name`` (and per ``data``)."""
  return fold(key, *data, jax.lax.axis_index(axis_name))

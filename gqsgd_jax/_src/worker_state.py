"""Partition specs for optimizer states holding per-worker memories.

Error-feedback compressors (PowerSGD, ACP-SGD, L-GreCo) keep a residual per
worker: it differs from device to device, so under ``jax.shard_map`` it
cannot travel with ``P()`` like the rest of an optax state. Such states list
the fields in a ``per_worker_fields`` class attribute, and store them as
flat 1-D arrays (scalars included), so that each worker's copy is one block
of a global array sharded over the data axis.
"""

import jax
from jax.sharding import PartitionSpec as P


def _is_stateful(node) -> bool:
  return bool(getattr(type(node), "per_worker_fields", ()))


def worker_state_specs(opt_state, axis_name="data"):
  """``PartitionSpec``s for an optax state: per-worker memories on ``axis``.

  Everything is ``P()`` (replicated) except the fields named by a state's
  ``per_worker_fields``, which get ``P(axis_name)``. Use the result as the
  optimizer state's in/out spec, and create the state inside the map so
  every worker starts with its own copy::

    specs = worker_state_specs(jax.eval_shape(tx.init, params))
    opt_state = jax.jit(jax.shard_map(
        tx.init, mesh=mesh, in_specs=P(), out_specs=specs))(params)

  Under ``jax.pmap`` per-device state is the default and no specs are needed.

  Args:
    opt_state: an optax state (or its ``jax.eval_shape``), chained or not.
    axis_name: the data-parallel mesh axis.

  Returns:
    A pytree of ``PartitionSpec`` matching ``opt_state``.
  """
  def specs(node):
    if not _is_stateful(node):
      return jax.tree.map(lambda _: P(), node)
    per_worker = type(node).per_worker_fields
    return type(node)(*[
        jax.tree.map(lambda _: P(axis_name) if f in per_worker else P(), v)
        for f, v in zip(node._fields, node)])
  return jax.tree.map(specs, opt_state, is_leaf=_is_stateful)

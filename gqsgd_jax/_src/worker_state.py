"""Partition specs for optimizer states holding per-worker memories.

Error-feedback compressors (PowerSGD, ACP-SGD, L-GreCo) keep a residual per
worker: it differs from device to device, so under ``jax.shard_map`` it
cannot travel with ``P()`` like the rest of an optax state. Such states name
the fields in a ``per_worker_fields`` class attribute (set by the
``per_worker`` class decorator), and store them as flat 1-D arrays (scalars
included), so that each worker's copy is one block of a global array sharded
over the data axis.
"""

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import jax
from jax.sharding import PartitionSpec as P
import optax

_StateType = TypeVar("_StateType", bound=type)

# A pytree of ``PartitionSpec`` (jax has no alias for it).
SpecTree = Any

# The class attribute naming a state's per-worker fields.
_ATTR = "per_worker_fields"


def per_worker(*fields: str) -> Callable[[_StateType], _StateType]:
  """Class decorator: names the per-worker fields of a NamedTuple state.

  Sets the class attribute ``per_worker_fields`` (a plain assignment in a
  NamedTuple body reads as a field to type checkers)::

    @per_worker("error")
    class MyState(NamedTuple):
      error: tuple
      count: jax.Array

  Args:
    *fields: names of fields of the decorated class.

  Returns:
    The decorator, which returns the class itself.
  """

  def decorate(cls: _StateType) -> _StateType:
    known = getattr(cls, "_fields", ())
    unknown = [f for f in fields if f not in known]
    if unknown:
      raise ValueError(
        f"fields {unknown} are not fields of {cls.__name__} ({known})"
      )
    # setattr: the attribute is not declared on the class (see above).
    setattr(cls, _ATTR, tuple(fields))
    return cls

  return decorate


def per_worker_fields(node: object) -> tuple[str, ...]:
  """The per-worker field names of ``node``'s state type; () if none."""
  return tuple(getattr(type(node), _ATTR, ()))


def _is_stateful(node: object) -> bool:
  return bool(per_worker_fields(node))


def worker_state_specs(
  opt_state: optax.OptState, axis_name: Hashable = "data"
) -> SpecTree:
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

  def fill(tree: Any, spec: P) -> SpecTree:
    return jax.tree.map(lambda _: spec, tree)

  def specs(node: Any) -> SpecTree:  # node: a state or any other subtree
    fields = per_worker_fields(node)
    if not fields:
      return fill(node, P())
    return type(node)(
      *[
        fill(v, P(axis_name) if f in fields else P())
        for f, v in zip(node._fields, node)
      ]
    )

  return jax.tree.map(specs, opt_state, is_leaf=_is_stateful)

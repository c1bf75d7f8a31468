"""Typed construction of the optax transformations this package returns.

optax's ``TransformUpdateFn`` takes any ``OptState``; each transformation's
update only ever receives the state its own init made. ``transformation``
lets an update annotate that state type (and read its fields) while the
pair is still checked to agree: the state ``init_fn`` returns is the state
``update_fn`` takes and returns.
"""

from collections.abc import Callable
from typing import cast, TypeVar

import optax

_State = TypeVar("_State", bound=optax.OptState)


def transformation(
  init_fn: Callable[[optax.Params], _State],
  update_fn: Callable[
    [optax.Updates, _State, optax.Params | None], tuple[optax.Updates, _State]
  ],
) -> optax.GradientTransformation:
  """``optax.GradientTransformation(init_fn, update_fn)``, type-checked."""
  # The casts widen the state type to optax's OptState (see the module
  # docstring) and name the arguments as optax's protocols do; nothing is
  # converted at run time.
  return optax.GradientTransformation(
    cast(optax.TransformInitFn, init_fn),
    cast(optax.TransformUpdateFn, update_fn),
  )

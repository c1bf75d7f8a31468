"""What the baselines share: the smallest usable norm, analytic wire bytes,
the check that gradients are floats.

The baselines live in their own package next to Global-QSGD's core (like
``optax.contrib`` next to optax): each module is one method, and anything
two of them need is defined here once.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Norms below the smallest normal float32 decode to zeros: dividing by a
# subnormal norm would overflow, and XLA:CPU flushes subnormals anyway.
TINY = float(np.finfo(np.float32).tiny)


class WireBytes(NamedTuple):
  """Analytic collective bytes of one step on one device.

  The two views of ``hlo.wire_report``: ``result`` is the size of what the
  collectives produce (its ``total_bytes``); ``sent``/``received`` are what
  each device transmits/receives when every collective runs a
  bandwidth-optimal algorithm (its ``sent_bytes``).
  """

  sent: float  # bytes each device transmits
  received: float  # bytes each device receives
  result: int  # bytes of the collectives' results


def check_float_leaves(
  leaves: Sequence[jax.Array],
  paths: Sequence[jax.tree_util.KeyPath],
  method: str,
) -> None:
  """Raises TypeError naming the first gradient leaf that is not floating
  point (any float dtype; ``bucketing.check_leaf_dtypes`` is stricter, it
  admits only the kernels' f32, bf16 and f16).

  Args:
    leaves: the gradient leaves.
    paths: their key paths (``jax.tree_util.tree_flatten_with_path``).
    method: the method's name, for the message.
  """
  for leaf, path in zip(leaves, paths):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
        f"gradient leaf {jax.tree_util.keystr(path)} has "
        f"dtype {leaf.dtype}; {method} needs floats"
      )

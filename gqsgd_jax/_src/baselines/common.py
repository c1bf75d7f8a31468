"""What the baselines share: the smallest usable norm, analytic wire bytes,
flag words for compaction without scatters.

The baselines live in their own package next to Global-QSGD's core (like
``optax.contrib`` next to optax): each module is one method, and anything
two of them need is defined here once.
"""

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


def flag_words(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A bool[n] mask as 32-bit words, element 32 w + j at bit 31 - j of word
  w (uint32[ceil(n / 32)], the tail padded with False), and each word's
  popcount (int32). A scan over the n / 32 counts then locates flagged
  elements by gathers: XLA:CPU scatters element by element."""
  n = mask.shape[0]
  words = -(-n // 32)
  lane = np.arange(32, dtype=np.uint32)
  word = jnp.sum(
    jnp.pad(mask, (0, 32 * words - n)).reshape(words, 32).astype(jnp.uint32)
    << jnp.asarray(31 - lane),
    axis=1,
    dtype=jnp.uint32,
  )
  return word, jax.lax.population_count(word).astype(jnp.int32)

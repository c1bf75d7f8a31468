"""What the baselines share: the smallest usable norm, analytic wire bytes.

The baselines live in their own package next to Global-QSGD's core (like
``optax.contrib`` next to optax): each module is one method, and anything
two of them need is defined here once.
"""

from typing import NamedTuple

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

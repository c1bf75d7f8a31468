"""Batched column orthonormalisation for the low-rank compressors.

PowerSGD, ACP-SGD and L-GreCo orthonormalise the columns of thin factors
(n x r, r << n) once or twice per step. Same-shaped factors are stacked and
orthonormalised in one vmapped call. As in the PyTorch reference, rank <= 2
uses modified Gram-Schmidt (two columns: cheaper than a Householder QR) and
larger ranks a reduced QR; column signs may differ between the two, which
does not matter because only the projection P P^T is used.

The factors are all-reduced before they are orthonormalised, so every worker
runs the same program on the same bits and gets the same result.
"""

import jax
import jax.numpy as jnp

# Largest rank handled by Gram-Schmidt (the reference's threshold).
GRAM_SCHMIDT_MAX_RANK = 2
DEFAULT_EPSILON = 1e-8


def validate_epsilon(
  epsilon: object, name: str = "orthogonalization_epsilon"
) -> float:
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
    raise ValueError(f"{name} must be a float >= 0, got {epsilon!r}")
  epsilon = float(epsilon)
  if not epsilon >= 0.0 or epsilon == float("inf"):
    raise ValueError(f"{name} must be a finite float >= 0, got {epsilon!r}")
  return epsilon


def gram_schmidt(
  matrix: jax.Array, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """Modified Gram-Schmidt on the columns of one n x r matrix.

  Column k is divided by ``norm + epsilon`` and its projection removed from
  the later columns. With epsilon > 0 an all-zero column stays zero instead
  of becoming NaN (the reference's default epsilon 0 gives 0/0 = NaN, which
  its warm start then keeps forever: bug B-PS-1). epsilon=0 reproduces the
  reference bit for bit in exact arithmetic.
  """
  cols = [matrix[:, k] for k in range(matrix.shape[1])]
  for k in range(len(cols)):
    col = cols[k] / (jnp.linalg.norm(cols[k]) + epsilon)
    cols[k] = col
    for j in range(k + 1, len(cols)):
      cols[j] = cols[j] - jnp.sum(col * cols[j]) * col
  return jnp.stack(cols, axis=1) if cols else matrix


def orthogonalize(
  matrices: jax.Array, epsilon: float = DEFAULT_EPSILON
) -> jax.Array:
  """Orthonormal columns for a matrix [n, r] or a batch [..., n, r].

  Args:
    matrices: float array with r <= n in the last two axes.
    epsilon: Gram-Schmidt's guard against zero columns (used for r <= 2).

  Returns:
    An array of the same shape and dtype. Zero columns stay zero with
    Gram-Schmidt (epsilon > 0); QR (r > 2) returns some orthonormal
    completion for them, never NaN.
  """
  if matrices.ndim < 2:
    raise ValueError(f"matrices must be [..., n, r], got {matrices.shape}")
  n, r = matrices.shape[-2:]
  if r > n:
    raise ValueError(f"matrices must have r <= n columns, got {n} x {r}")
  batch = matrices.shape[:-2]
  flat = matrices.reshape((-1, n, r))
  if r <= GRAM_SCHMIDT_MAX_RANK:
    out = jax.vmap(lambda m: gram_schmidt(m, epsilon))(flat)
  else:
    out = jax.vmap(lambda m: jnp.linalg.qr(m, mode="reduced")[0])(flat)
  return out.reshape(batch + (n, r))


def refresh_zero_columns(matrices: jax.Array, fresh: jax.Array) -> jax.Array:
  """Replaces all-zero columns by those of ``fresh`` (shared N(0, 1) draws).

  A warm-started factor becomes zero after a step whose gradient was zero
  (a frozen or unused layer). Orthonormalising zero gives zero, so the
  power iteration would never leave it and error feedback would pile up the
  layer's later gradients unsent. Drawing a fresh column, as at the first
  step, restarts it (as PowerSGD's reference does with zero columns).
  Columns with any non-zero entry pass through untouched, so a live factor
  is bit-identical.
  """
  dead = jnp.all(matrices == 0, axis=-2, keepdims=True)
  return jnp.where(dead, fresh, matrices)

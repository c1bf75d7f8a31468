"""Every compressor the library ships, for the cross-cutting tests.

Each entry builds a fresh transform for ``axis_name="data"``; the
reliability tests (checkpointing, determinism, fuzzing) run all of them.
"""

import jax.numpy as jnp

import gqsgd_jax

METHODS = {
  "f32_psum": lambda **kw: gqsgd_jax.psum_mean(**kw),
  "bf16_psum": lambda **kw: gqsgd_jax.psum_mean(wire_dtype=jnp.bfloat16, **kw),
  "gq8_psum": lambda **kw: gqsgd_jax.global_quantize(
    bits=8, reduction="psum", **kw
  ),
  "gq4_butterfly": lambda **kw: gqsgd_jax.global_quantize(
    bits=4, reduction="butterfly", **kw
  ),
  "gq3_butterfly_leaf": lambda **kw: gqsgd_jax.global_quantize(
    bits=3, reduction="butterfly", granularity="leaf", **kw
  ),
  "gq4_two_shot_g8": lambda **kw: gqsgd_jax.global_quantize(
    bits=4, reduction="two_shot", gather_bits=8, **kw
  ),
  "gq4_owner_feedback": lambda **kw: gqsgd_jax.global_quantize(
    bits=4, reduction="two_shot", owner_feedback=True, **kw
  ),
  "gq_exponential": lambda **kw: gqsgd_jax.global_quantize(
    bits=8, dithering="exponential", **kw
  ),
  "thc": lambda **kw: gqsgd_jax.thc(granularity="leaf", **kw),
  "qsgd": lambda **kw: gqsgd_jax.qsgd(**kw),
  # Low-rank and sparsifying baselines, configured so that the small test
  # problems are really compressed from the first step.
  "powersgd": lambda **kw: gqsgd_jax.powersgd(
    rank=1, start_iter=1, min_compression_rate=1, **kw
  ),
  "acpsgd": lambda **kw: gqsgd_jax.acpsgd(rank=1, **kw),
  "lgreco": lambda **kw: gqsgd_jax.lgreco(
    rank=2,
    start_iter=1,
    min_compression_rate=1,
    adjust_every=2,
    acc_iters=1,
    **kw,
  ),
  "jointsq": lambda **kw: gqsgd_jax.jointsq(
    compression_ratio=0.25, min_size=8, **kw
  ),
  "dgc": lambda **kw: gqsgd_jax.dgc(density=0.25, min_size=8, **kw),
}

# Methods whose output is a random function of the key (determinism tests).
# PowerSGD's key only picks the starting subspace: on the test problem the
# gradient matrix has rank 1 and is recovered exactly from any start.
STOCHASTIC = {
  "gq8_psum",
  "gq4_butterfly",
  "gq3_butterfly_leaf",
  "gq4_two_shot_g8",
  "gq4_owner_feedback",
  "gq_exponential",
  "thc",
  "qsgd",
  "jointsq",
}

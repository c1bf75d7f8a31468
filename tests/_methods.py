"""Every compressor the library ships, for the cross-cutting tests.

Each entry builds a fresh transform for ``axis_name="data"``; the
reliability tests (checkpointing, determinism, fuzzing) run all of them.
"""

import jax.numpy as jnp

import gqsgd_jax

METHODS = {
    "f32_psum": lambda: gqsgd_jax.psum_mean(),
    "bf16_psum": lambda: gqsgd_jax.psum_mean(wire_dtype=jnp.bfloat16),
    "gq8_psum": lambda: gqsgd_jax.global_quantize(bits=8, reduction="psum"),
    "gq4_butterfly": lambda: gqsgd_jax.global_quantize(
        bits=4, reduction="butterfly"),
    "gq3_butterfly_leaf": lambda: gqsgd_jax.global_quantize(
        bits=3, reduction="butterfly", granularity="leaf"),
    "gq_exponential": lambda: gqsgd_jax.global_quantize(
        bits=8, dithering="exponential"),
    "thc": lambda: gqsgd_jax.thc(granularity="leaf"),
    "qsgd": lambda: gqsgd_jax.qsgd(),
}

# Methods whose output is a random function of the key (determinism tests).
STOCHASTIC = {"gq8_psum", "gq4_butterfly", "gq3_butterfly_leaf",
              "gq_exponential", "thc", "qsgd"}

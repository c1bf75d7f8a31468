"""Examples of gqsgd_jax: data-parallel training with compressed gradients."""

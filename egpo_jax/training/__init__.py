"""egpo_jax.training."""

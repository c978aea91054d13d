"""egpo_jax.core."""

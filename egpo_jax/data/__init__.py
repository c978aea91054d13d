"""egpo_jax.data."""

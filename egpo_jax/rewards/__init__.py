"""egpo_jax.rewards."""

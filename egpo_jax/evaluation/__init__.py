"""egpo_jax.evaluation."""

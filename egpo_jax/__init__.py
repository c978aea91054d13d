"""egpo_jax: EGPO and GRPO-family RLVR for language models in JAX/Flax."""

__version__ = "0.1.0"

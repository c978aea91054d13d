"""Benchmarks against the systems users would pick instead of egpo_jax (TRL, Tunix).

Every system runs the same workload (`spec.Workload`) on the same weights (one random
Qwen2ForCausalLM saved as safetensors by `model.py`), each in its own virtualenv
(`venvs.py`), driven round-robin by `compare.py`. See benchmarks/README.md.
"""

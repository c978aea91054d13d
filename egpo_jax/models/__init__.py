"""Policy models: a Flax decoder of the Qwen2/Qwen2.5/Llama family, tokenizers, HF I/O."""

"""Tasks and datasets: import the module you need (none is imported here, so that using
the jnp synthetic task does not import tensorflow-datasets).

  synthetic  the procedural arithmetic task in pure jnp: prompts, worked solutions, verifier
  builders   tfds builders (array_record) for MATH-500, GSM8K, Minerva, MMLU-STEM, AIME24,
             AMC23, a user's JSONL and the synthetic task; `prepare` builds and opens one
  records    JSONL -> uniform records, answer extraction, bad-record reports and policy
  loader     PromptIterator: grain batches of left-padded prompts, sharded, resumable
  templates  prompt templates per model family (Qwen2.5-Math, R1-Distill, plain)
"""

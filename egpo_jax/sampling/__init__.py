"""The rollout engine: KV-cache group sampling with the old policy's log-probs."""

from egpo_jax.sampling.engine import (DecodeState, Generation, SamplingSpec, bucket_length,
                                      cache_plan, compilation_counts, continue_rollout, finish_rollout,
                                      generate, response_keys, rollout, start_rollout,
                                      step_uniforms)
from egpo_jax.sampling.filters import (check_sampling_args, filter_logits, sample_tokens,
                                       sample_tokens_from_uniforms, sample_with_logps,
                                       token_logps_and_entropy,
                                       top_p_keep_mask, truncate_logits)

__all__ = [
    "DecodeState", "Generation", "SamplingSpec", "bucket_length", "cache_plan",
    "check_sampling_args",
    "compilation_counts", "continue_rollout", "filter_logits", "finish_rollout", "generate",
    "response_keys", "rollout", "sample_tokens", "sample_tokens_from_uniforms", "sample_with_logps",
    "start_rollout", "step_uniforms", "token_logps_and_entropy", "top_p_keep_mask",
    "truncate_logits",
]

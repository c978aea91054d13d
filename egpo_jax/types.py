"""Shape legend and the pytrees that flow through an RL iteration.

B prompts, G responses per prompt (group size), N = B*G responses, P prompt length,
T response length, L = P + T, V vocabulary, D model width. Arrays carry their shape in
their name: rewards_BxG, adv_N, logps_NxT, mask_NxT, logits_NxTxV.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Params = Any


class RolloutBatch(flax.struct.PyTreeNode):
  """What the update consumes: N responses with their prompts, old log-probs, advantages.

  Prompts are left-padded; completion positions after EOS are masked out.
  `ref_logps_NxT` is only read when the KL coefficient is non-zero.
  """
  prompt_ids_NxP: jax.Array
  prompt_mask_NxP: jax.Array
  completion_ids_NxT: jax.Array
  completion_mask_NxT: jax.Array
  old_logps_NxT: jax.Array
  adv_N: jax.Array
  ref_logps_NxT: jax.Array
  is_weights_NxT: jax.Array

  @property
  def num_responses(self) -> int:
    return self.completion_ids_NxT.shape[0]


class TrainState(flax.struct.PyTreeNode):
  """Parameters, optimizer state and the counters that survive a restart.

  `nonfinite_streak` counts consecutive skipped updates (non-finite loss or gradient);
  `nonfinite_total` all of them.
  """
  step: jax.Array
  params: Params
  opt_state: Any
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array

  @classmethod
  def create(cls, params: Params, opt_state: Any) -> "TrainState":
    # Separate buffers: the training loop donates the state, and XLA refuses to donate
    # one buffer twice.
    zero = lambda: jnp.zeros((), jnp.int32)
    return cls(step=zero(), params=params, opt_state=opt_state, nonfinite_streak=zero(),
               nonfinite_total=zero())

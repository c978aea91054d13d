"""egpo_jax.core: pure, chex-checked maths of the training path.

Importing this package registers the advantage estimators in
`egpo_jax.core.registry.advantage_estimators` ("grpo", "dr_grpo", "rloo", "edge_grpo",
"egpo") and the policy loss "ppo_clip" in `registry.policy_losses`.
"""

from egpo_jax.core import advantages
from egpo_jax.core import diagnostics
from egpo_jax.core import entropy
from egpo_jax.core import logprobs
from egpo_jax.core import losses
from egpo_jax.core import registry
from egpo_jax.core.advantages import AdvantageOutput
from egpo_jax.core.advantages import EGPOVariant
from egpo_jax.core.advantages import egpo_advantages
from egpo_jax.core.advantages import egpo_variant
from egpo_jax.core.advantages import egpo_weights
from egpo_jax.core.entropy import entropy_proxy
from egpo_jax.core.entropy import segment_mask
from egpo_jax.core.entropy import token_entropy
from egpo_jax.core.logprobs import token_logprobs
from egpo_jax.core.losses import policy_loss

"""The embedded default: a tiny byte-level Qwen2-style model learns the synthetic
arithmetic task by supervised warm-up, then improves with EGPO, on a laptop CPU.

    python -m experiments.main                       # this config
    python -m experiments.main --config.algo.advantage=grpo --config.train.iterations=40
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"          # a named config (egpo_jax.models.config), or "hf"
  # For "hf": the backbone's named config; its shapes are checked against model.path's
  # config.json, and with model.path empty they are the shapes (random weights: dry runs).
  c.model.name = ""
  c.model.path = ""                # for "hf": checkpoint folder (config.json + safetensors)
  c.model.dtype = "float32"        # compute dtype; params stay float32
  c.model.remat = False
  c.model.remat_policy = ""        # none | full | dots_saveable | ...; "" follows remat
  c.model.attention = "blockwise"  # reference | blockwise | cudnn (GPU) | splash (TPU)

  c.task = ml_collections.ConfigDict()
  c.task.name = "synthetic"        # "synthetic" (jnp verifier, jitted loop) or "jsonl"
  c.task.difficulty = 2
  c.task.train_file = ""           # for "jsonl": the user's training JSONL
  c.task.problem_field = "problem"
  c.task.answer_field = "answer"
  c.task.max_prompt_len = 16
  c.task.reward = "synthetic"      # a name in egpo_jax.core.registry.reward_functions
  c.task.template = "plain"        # prompt template: plain | qwen25_math | r1_distill
  c.task.on_bad_record = "skip"    # a bad JSONL record: "skip" (warn, go on) or "raise"
  c.task.max_new_tokens_field = ""  # JSONL key of a record's response cap (needs slots)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_batch = 64
  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 24
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  # Decode loops, each on a cache holding only the slots it reaches (engine docstring):
  # less attention read per token, one more loop body to compile per phase.
  c.rollout.cache_phases = 4
  # Prompts of at least this many tokens (their length bucket) keep their KV-cache slots
  # once per group instead of G times (engine docstring); 0 = always.
  c.rollout.shared_prompt_min_len = 64
  c.rollout.stop_strings = ()      # host mode: a response ends after the first of these
  c.rollout.stop_token_ids = ()    # ids ending a response besides EOS (e.g. <|im_end|>)
  c.rollout.slots = 0              # host mode: > 0 = continuous batching on that many slots
  c.rollout.chunk_steps = 32       # with slots: steps between hand-offs to the verifier
  c.rollout.tensor = 0             # host mode: > 0 = decode on a data x tensor mesh of it
  # With slots: "bounded" attention reads only each slot's used cache blocks, "full" all,
  # "pallas" the bounded blocks through a Pallas kernel (GPU/TPU).
  c.rollout.decode_attention = "bounded"
  c.rollout.read_block = 64        # with bounded/pallas: own cache slots per block read
  c.rollout.table_entries = 0      # with slots: prompt-table entries (0 = all B prompts)

  c.algo = ml_collections.ConfigDict()
  c.algo.advantage = "egpo"        # a name in egpo_jax.core.registry.advantage_estimators
  c.algo.variant = "egpo"          # egpo | C1 ... C6 | lock_one
  c.algo.lam_min = 0.8
  c.algo.lam_max = 2.0
  c.algo.eps_h = 1e-5
  c.algo.nsr_advantage = -1.0
  c.algo.ddof = 1
  c.algo.std_eps = 1e-6
  c.algo.entropy_segment = "joint"  # joint | thinking | answer
  c.algo.segment_delimiter = "</think>"
  c.algo.edge_clamp = (0.5, 2.0)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "ppo_clip"         # a name in egpo_jax.core.registry.policy_losses
  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.2
  c.loss.dual_clip = 0.0           # 0 = off
  c.loss.aggregation = "token-mean"
  c.loss.kl_coef = 0.0
  c.loss.kl_estimator = "k3"
  c.loss.old_logps = "sampler"     # sampler | recompute
  c.loss.tis_cap = 0.0             # truncated importance sampling cap; 0 = off
  c.loss.overlong_buffer = 0       # DAPO soft overlong penalty buffer; 0 = off
  c.loss.mask_truncated = False
  c.loss.logprob_chunk = 1024

  c.dynamic_sampling = ml_collections.ConfigDict()
  c.dynamic_sampling.enabled = False
  c.dynamic_sampling.oversample = 2  # jitted mode: sample this many times the prompts
  c.dynamic_sampling.max_tries = 4   # host mode

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"    # constant | cosine
  c.optim.warmup_steps = 10        # lr warm-up: Adam's first RL steps are otherwise too large
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0
  c.optim.moment_dtype = "float32"   # AdamW moments' storage: float32 | bfloat16

  c.ppo = ml_collections.ConfigDict()   # the update: PPO epochs x minibatches
  c.ppo.epochs = 1
  c.ppo.minibatches = 1
  c.ppo.micro_batches = 1
  # Each prompt's forward/backward runs once for its G responses (the same update up to
  # float rounding) when micro-batches hold whole groups; False runs it per response.
  c.ppo.share_prompts = True
  c.ppo.length_buckets = 0         # host mode: > 0 trims micro-batches to length buckets

  c.warmup = ml_collections.ConfigDict()   # the SFT warm-up before RL (training/warmup.py)
  c.warmup.steps = 500             # lands the tiny model at ~45% sampled accuracy
  c.warmup.batch_size = 64
  c.warmup.lr = 3e-3

  c.train = ml_collections.ConfigDict()
  c.train.iterations = 100
  c.train.iterations_per_call = 10   # K: jitted iterations between host syncs
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_nonfinite = 5
  c.train.eval_prompts = 256       # validation prompts (x4 samples), a fixed set
  c.train.eval_every = 20          # validation (accuracy, calibration) every N iterations
  c.train.eval_set = ""            # host-verified tasks: held-out benchmark or JSONL
  c.train.tensorboard = True

  # Devices: a (data, fsdp, tensor) mesh over every device of every process; -1 = the
  # rest. See docs/LAUNCHING.md for what each axis splits and how to launch on many hosts.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # Multi-process runs: "auto" joins when num_processes > 1; "on" also lets JAX detect a
  # Cloud TPU pod slice, SLURM or Open MPI. Empty / 0 / -1 read EGPO_COORDINATOR_ADDRESS,
  # EGPO_NUM_PROCESSES, EGPO_PROCESS_ID from the environment.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "auto"      # auto | on | off
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.timeout_s = 300
  return c

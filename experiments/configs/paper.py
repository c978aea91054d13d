"""The paper's training setup (docs/METHOD.md, "Training setup"), per algorithm and backbone.

    python -m experiments.main --config=experiments/configs/paper.py:egpo,qwen2.5-math-1.5b \
        --config.model.path=/ckpt/Qwen2.5-Math-1.5B --config.task.train_file=/data/train.jsonl

Algorithms: egpo, grpo, dapo, edge_grpo (and egpo_c1 ... egpo_c6 for Table 2's variants).
Backbones: qwen2.5-math-1.5b, qwen2.5-math-7b, deepseek-r1-distill-qwen-1.5b,
deepseek-r1-distill-qwen-7b. The checkpoint folder and the training JSONL are required.
"""

import ml_collections

from experiments.configs import default

ALGORITHMS = ("egpo", "grpo", "dapo", "edge_grpo") + tuple(f"egpo_c{i}" for i in range(1, 7))
BACKBONES = ("qwen2.5-math-1.5b", "qwen2.5-math-7b", "deepseek-r1-distill-qwen-1.5b",
             "deepseek-r1-distill-qwen-7b")


def paper_config(algorithm: str, backbone: str) -> ml_collections.ConfigDict:
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm {algorithm!r}: use one of {ALGORITHMS}")
  if backbone not in BACKBONES:
    raise ValueError(f"backbone {backbone!r}: use one of {BACKBONES}")
  c = default.get_config()
  c.model.preset = "hf"
  c.model.name = backbone
  c.model.path = ""                       # required: the HF checkpoint folder
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"           # each layer recomputed in the backward pass
  c.model.attention = "blockwise"         # O(L x block) attention memory on any backend

  c.task.name = "jsonl"
  c.task.train_file = ""                  # required: e.g. OpenR1-stable-10K as JSONL
  c.task.problem_field = "problem"
  c.task.answer_field = "answer"
  c.task.reward = "math"
  c.task.max_prompt_len = 1024
  r1 = backbone.startswith("deepseek")
  c.task.template = "r1_distill" if r1 else "qwen25_math"

  c.rollout.prompts_per_batch = 64        # authors' runs
  c.rollout.group_size = 16
  c.rollout.max_new_tokens = 3072
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0

  c.algo.advantage = "egpo"
  c.algo.variant = "egpo"
  c.algo.lam_min = 0.8
  c.algo.lam_max = 2.0
  c.algo.eps_h = 1e-5
  # Joint entropy for the Qwen2.5-Math runs; the answer segment after </think> for R1.
  c.algo.entropy_segment = "answer" if r1 else "joint"

  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.2
  c.loss.aggregation = "token-mean"
  c.loss.kl_coef = 0.0
  c.loss.old_logps = "recompute"          # verl's default: the trainer's own forward pass

  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0

  c.ppo.epochs = 1                        # one optimizer step per rollout batch
  c.ppo.minibatches = 1
  # Rows per pass (update, and the old/reference log-probs): 64 for 1.5B, 16 for 7B, each
  # device computing its rows of every micro-batch (rows over data x fsdp), layers
  # rematerialised, blockwise attention. Compile-only per-device peaks: BENCHMARKS.md
  # "paper_scale" (CPU estimates).
  c.ppo.micro_batches = 64 if "7b" in backbone else 16
  # 16 rows are one prompt's group: shared, that prompt would run on every device of the
  # batch axes (replicated, with activation all-reduces); unshared each device runs its
  # own rows' prompts, the same FLOPs per device at 1 row per device.
  c.ppo.share_prompts = False

  # Host mode's rollout (runs with task.name="jsonl"): continuous batching on 256 decode
  # slots, so its KV cache is 256 x 3,071 slots whatever B x G is (the static sampler's
  # 1,024 x 4,095 bf16 cache alone is 10.6 GB per device for 7B on 16 devices). Chunks of
  # 256 steps (48 per iteration at the worst case): the verifier still gets the finished
  # responses every few seconds (each process its own, across processes), and each
  # chunk's call slices the decode weights once. The prompt table holds all 64 prompts
  # (0.9 GB per device for 7B, whole on every data replica): a table of 3 S / G = 48
  # entries refilled inside the loop (rollout.table_entries) prefills there with the
  # stacked weights and measured larger (7B x16 decode: 23.6 against 16.2 GB, CPU
  # estimates).
  c.rollout.slots = 256
  c.rollout.chunk_steps = 256
  # Train on FSDP alone (no Megatron all-reduces: the update stays under its FSDP floor)
  # and decode on the rollout's own mesh over the same devices (`distributed.rollout_mesh`:
  # data-parallel groups of `tensor` devices, no weight gathered per step; params cast to
  # bf16 and resharded there once per iteration). 7B: groups of 4 (a quarter of its 15 GB
  # of bf16 weights per device; 4 divides its 28 query and 4 KV heads). 1.5B: groups of 2
  # (its 2 KV heads): whole per device (tensor 1), its rollout was 17.7 GB on 16 devices
  # (CPU estimate), on 2 it is 11.8 GB.
  c.rollout.tensor = 4 if backbone.endswith("7b") else 2
  c.warmup.steps = 0
  c.train.iterations = 770                # ~5 epochs of OpenR1-stable-10K at 64 prompts
  c.train.iterations_per_call = 1
  c.train.checkpoint_every = 20
  c.train.eval_prompts = 64

  if algorithm == "grpo":
    c.algo.advantage = "grpo"
  elif algorithm == "dapo":
    c.algo.advantage = "grpo"
    c.loss.eps_high = 0.28
    c.dynamic_sampling.enabled = True
    c.dynamic_sampling.max_tries = 4
    c.loss.overlong_buffer = 512
  elif algorithm == "edge_grpo":
    c.algo.advantage = "edge_grpo"
    c.algo.edge_clamp = (0.5, 2.0)
  elif algorithm.startswith("egpo_c"):
    c.algo.variant = "C" + algorithm[-1]
  return c


def get_config(arg: str = "egpo,qwen2.5-math-1.5b") -> ml_collections.ConfigDict:
  algorithm, _, backbone = arg.partition(",")
  return paper_config(algorithm.strip(), backbone.strip() or "qwen2.5-math-1.5b")

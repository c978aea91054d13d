"""Tunix worker (run with the Tunix virtualenv's python; protocol in `spec`).

    .../tunix/bin/python -m benchmarks.peers.run_tunix --model tiny --scenario iteration

The shared safetensors are loaded with `tunix.models.qwen2.params`; one RLCluster with
the "vanilla" rollout engine (Tunix's KV-cache sampler), no reference model (beta 0).
"iteration": `GRPOLearner.train` on one batch of B prompts (G samples each, token-mean
loss, epsilon 0.2, one AdamW step with grad-norm clip 1), reward 1 if the completion
contains the target word. A fresh one-batch iterable per repeat, so every "run" is one
global step, timed around `train`. Phases: "generation" is
`_generate_and_compute_advantage` (sampling, rewards, advantages), "update" the rest.
"rollout": `RLCluster.generate` of the B x G prompts. Exactly T new tokens: the only EOS
id is one the model cannot sample (outside the vocabulary).
"""

from __future__ import annotations

import json
import os
import time

from benchmarks.peers import spec


def _versions() -> dict[str, str]:
  import importlib.metadata as md
  return {p: md.version(p) for p in ("google-tunix", "jax", "flax", "optax")}


def _cluster(model_dir: str, w: spec.Workload):
  import jax
  import optax
  import transformers
  from tunix.models.qwen2 import model as qwen2_model
  from tunix.models.qwen2 import params as qwen2_params
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.rollout import base_rollout

  with open(os.path.join(model_dir, "config.json")) as f:
    hf = json.load(f)
  config = qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"],
      rope_theta=int(hf["rope_parameters"]["rope_theta"]), norm_eps=hf["rms_norm_eps"],
      use_tied_embedding=hf["tie_word_embeddings"])
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = qwen2_params.create_model_from_safe_tensors(model_dir, config, mesh)
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=w.new_tokens, max_prompt_length=w.prompt_len,
      kv_cache_size=w.prompt_len + w.new_tokens + 16, temperature=w.temperature,
      top_p=1.0, top_k=None, eos_tokens=[spec.VOCAB_SIZE + 1])
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adamw(w.learning_rate, weight_decay=0.0)),
      eval_every_n_steps=10**9, max_steps=10**6)
  roles = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False, training_config=training,
      rollout_config=rollout)
  return rl_cluster_lib.RLCluster(actor=model, reference=None, tokenizer=tokenizer,
                                  cluster_config=cluster_config)


def _rollout_worker(cluster, w: spec.Workload):
  prompts = [spec.prompt_text(p) for p in w.prompt_ids() for _ in range(w.group_size)]

  def run_once():
    start = time.perf_counter()
    out = cluster.generate(prompts=prompts)
    seconds = time.perf_counter() - start
    lengths = {len(t) for t in out.tokens}
    assert lengths == {w.new_tokens}, f"Tunix generated lengths {sorted(lengths)}"
    return seconds, {"generation": seconds}

  return (lambda: [run_once() for _ in range(2)]), run_once


def _iteration_worker(cluster, w: spec.Workload):
  import numpy as np
  from tunix.rl.grpo import grpo_learner
  target = spec.token_text(w.target_id)

  def contains_target(prompts, completions, **kwargs):
    del prompts, kwargs
    return [1.0 if target in c.split() else 0.0 for c in completions]

  algo = grpo_learner.GRPOConfig(num_generations=w.group_size, num_iterations=1, beta=0.0,
                                 epsilon=w.clip_eps, loss_agg_mode="token-mean")
  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                     reward_fns=contains_target)
  timing = {"generation": 0.0}
  original = learner._generate_and_compute_advantage

  def timed_generation(*args, **kwargs):
    start = time.perf_counter()
    out = original(*args, **kwargs)
    timing["generation"] += time.perf_counter() - start
    return out

  learner._generate_and_compute_advantage = timed_generation
  # A batch as Tunix's data pipelines (grain) give it: arrays, not lists.
  batch = {"prompts": np.array([spec.prompt_text(p) for p in w.prompt_ids()])}

  def run_once():
    timing["generation"] = 0.0
    steps = cluster.global_steps
    start = time.perf_counter()
    learner.train([batch])
    seconds = time.perf_counter() - start
    assert cluster.global_steps == steps + 1, "Tunix did not take exactly one step"
    return seconds, {"generation": timing["generation"],
                     "update": seconds - timing["generation"]}

  return (lambda: [run_once() for _ in range(2)]), run_once


def main() -> None:
  parser = spec.worker_parser(__doc__)
  args = parser.parse_args()
  w = spec.workload(args.quick)
  cluster = _cluster(spec.model_dir(args.model), w)
  if args.scenario == "rollout":
    setup, run_once = _rollout_worker(cluster, w)
  else:
    setup, run_once = _iteration_worker(cluster, w)
  info = {"system": "Tunix GRPOLearner" if args.scenario == "iteration"
          else "Tunix vanilla rollout", "versions": _versions()}
  spec.serve(setup, run_once, info)


if __name__ == "__main__":
  main()

"""TRL worker (run with the TRL virtualenv's python; protocol in `spec`).

    .../trl/bin/python -m benchmarks.peers.run_trl --model tiny --scenario iteration

"iteration": `trl.GRPOTrainer` on the shared weights and tokenizer, one optimizer step per
generation batch of B x G completions (loss_type "dapo" = token-mean over the batch,
epsilon 0.2, beta 0, scale_rewards "group", AdamW, grad-norm clip 1), exactly T new tokens
(`min_new_tokens` = T keeps EOS out), reward 1 if the completion contains the target id.
`trainer.train` runs in a thread that a callback holds at each step's start until a "run"
arrives, so the trainer is set up once and steps are timed as training runs them.
Phases: "generation" is `_generate_and_score_completions` (sampling, rewards,
advantages), "update" the rest of the step (forward, backward, optimizer).
"rollout": `model.generate` for the B x G rows, KV cache, the same sampling settings.
"""

from __future__ import annotations

import threading
import time

from benchmarks.peers import spec


def _versions() -> dict[str, str]:
  import importlib.metadata as md
  return {p: md.version(p) for p in ("trl", "transformers", "torch", "accelerate")}


def _rollout_worker(model_dir: str, w: spec.Workload, threads: int | None):
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
  model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  ids = torch.tensor([p for p in w.prompt_ids() for _ in range(w.group_size)])
  attention = torch.ones_like(ids)
  torch.manual_seed(w.seed)

  def run_once():
    start = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=attention, do_sample=True,
                           temperature=w.temperature, top_k=0, top_p=1.0,
                           max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                           pad_token_id=w.pad_id)
    seconds = time.perf_counter() - start
    assert tuple(out.shape) == (w.num_responses, w.prompt_len + w.new_tokens), out.shape
    return seconds, {"generation": seconds}

  return (lambda: [run_once() for _ in range(2)]), run_once


class _Gate:
  """Holds the trainer at each step's start until `step()` is called; times the step."""

  def __init__(self):
    self.go = threading.Semaphore(0)
    self.done = threading.Semaphore(0)
    self.start = 0.0
    self.seconds = 0.0
    self.generation = 0.0
    self.error: BaseException | None = None

  def step(self) -> tuple[float, dict[str, float]]:
    self.generation = 0.0
    self.go.release()
    self.done.acquire()
    if self.error is not None:
      raise RuntimeError("the TRL trainer thread failed") from self.error
    return self.seconds, {"generation": self.generation,
                          "update": self.seconds - self.generation}


def _iteration_worker(model_dir: str, w: spec.Workload, threads: int | None, steps: int):
  import datasets
  import torch
  import transformers
  import trl
  if threads:
    torch.set_num_threads(threads)
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
  model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  # The same prompts repeated, so one epoch holds many steps (no per-epoch set-up).
  prompts = [spec.prompt_text(p) for p in w.prompt_ids()] * max(steps, 1)
  dataset = datasets.Dataset.from_dict({"prompt": prompts})

  def contains_target(completions, completion_ids, **kwargs):
    del completions, kwargs
    return [1.0 if w.target_id in ids else 0.0 for ids in completion_ids]

  config = trl.GRPOConfig(
      output_dir="/tmp/egpo_jax_peer_trl", use_cpu=True, bf16=False, fp16=False,
      per_device_train_batch_size=w.num_responses, gradient_accumulation_steps=1,
      num_generations=w.group_size, max_completion_length=w.new_tokens,
      generation_kwargs={"min_new_tokens": w.new_tokens}, temperature=w.temperature,
      top_k=0, top_p=1.0, beta=0.0, epsilon=w.clip_eps, loss_type="dapo",
      scale_rewards="group", num_iterations=1, learning_rate=w.learning_rate,
      weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", max_steps=steps,
      shuffle_dataset=False, logging_steps=10**9, save_strategy="no", report_to="none",
      log_completions=False, disable_tqdm=True, dataloader_num_workers=0, seed=w.seed)
  gate = _Gate()

  class GateCallback(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      gate.go.acquire()
      gate.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      gate.seconds = time.perf_counter() - gate.start
      gate.done.release()

  trainer = trl.GRPOTrainer(model=model, reward_funcs=contains_target, args=config,
                            train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[GateCallback()])
  original = trainer._generate_and_score_completions

  def timed_generation(*args, **kwargs):
    start = time.perf_counter()
    out = original(*args, **kwargs)
    gate.generation += time.perf_counter() - start
    mask = out["completion_mask"]
    assert tuple(mask.shape) == (w.num_responses, w.new_tokens) and bool(mask.all()), (
        "TRL did not generate exactly new_tokens tokens per row")
    return out

  trainer._generate_and_score_completions = timed_generation

  def train():
    try:
      trainer.train()
      gate.error = RuntimeError(f"the trainer stopped after max_steps={steps}: raise "
                                "--max-steps")
      gate.done.release()
    except BaseException as e:  # handed to the main thread, which reports it
      gate.error = e
      gate.done.release()

  def setup():
    threading.Thread(target=train, daemon=True).start()
    for _ in range(2):
      gate.step()

  return setup, gate.step


def main() -> None:
  parser = spec.worker_parser(__doc__)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  parser.add_argument("--max-steps", type=int, default=64,
                      help="upper bound on warm-up + timed repeats")
  args = parser.parse_args()
  w = spec.workload(args.quick)
  model_dir = spec.model_dir(args.model)
  if args.scenario == "rollout":
    setup, run_once = _rollout_worker(model_dir, w, args.threads)
  else:
    setup, run_once = _iteration_worker(model_dir, w, args.threads, args.max_steps)
  import torch
  info = {"system": "TRL GRPOTrainer" if args.scenario == "iteration"
          else "transformers generate", "versions": _versions(),
          "threads": torch.get_num_threads()}
  spec.serve(setup, run_once, info)


if __name__ == "__main__":
  main()

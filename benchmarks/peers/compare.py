"""egpo_jax against TRL and Tunix on the same model and work; rewrites the "peers" section
of BENCHMARKS.md.

    python -m benchmarks.peers.compare --setup            # venvs + model files, then all
    python -m benchmarks.peers.compare --quick            # small workload, 2 repeats
    python -m benchmarks.peers.compare --systems ours,trl --models tiny --scenarios iteration
    python -m benchmarks.peers.compare --resume           # skip cells already measured

For each (model, scenario) cell, one warm worker per system (`run_ours`, `run_trl`,
`run_tunix`, each in its own virtualenv) loads the shared safetensors, compiles and warms
up; then the orchestrator asks them for one timed repeat each, round-robin, so drift of
the machine hits all alike, and reports medians. Results accumulate in
<cache>/results.json (per cell and system), so a crashed or skipped peer can be rerun
alone and the table is rebuilt from everything measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import statistics
import subprocess
import sys
import time

from benchmarks.peers import spec, venvs

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RUNNERS = {"ours": "benchmarks.peers.run_ours", "trl": "benchmarks.peers.run_trl",
            "tunix": "benchmarks.peers.run_tunix"}
# Ours / peer speed-up targets of the issue (whole GRPO iteration).
TARGETS = {("tiny", "trl"): 10.0, ("tiny", "tunix"): 5.0,
           ("small", "trl"): 1.3, ("small", "tunix"): 1.7}
SECTION = "peers"


class Worker:
  """A runner process speaking the line protocol of `spec`."""

  def __init__(self, system: str, cmd: list[str], *, log_path: str):
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.system = system
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log, text=True,
                                 bufsize=1)

  def read(self, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError(f"{self.system}: no answer within {timeout:.0f} s "
                           f"(log: {self.log.name})")
      ready, _, _ = select.select([self.proc.stdout], [], [], left)
      if ready:
        line = self.proc.stdout.readline()
        if not line:
          raise RuntimeError(f"{self.system} exited with {self.proc.wait()}; see "
                             f"{self.log.name}")
        msg = json.loads(line)
        if "error" in msg:
          raise RuntimeError(f"{self.system}: {msg['error']}")
        return msg

  def run(self, timeout: float) -> dict:
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self.read(timeout)

  def close(self) -> None:
    try:
      if self.proc.poll() is None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
    self.log.close()


def worker_command(system: str, model: str, scenario: str, *, quick: bool,
                   extra_args: list[str]) -> list[str]:
  """The runner of `system` in its own virtualenv (ours: this interpreter)."""
  py = sys.executable if system == "ours" else venvs.python(system)
  return [py, "-m", _RUNNERS[system], "--model", model, "--scenario", scenario,
          *(["--quick"] if quick else []), *extra_args]


def results_path() -> str:
  return os.path.join(spec.cache_dir(), "results.json")


def load_results() -> dict:
  try:
    with open(results_path()) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _key(quick: bool, model: str, scenario: str, system: str) -> str:
  return f"{'quick' if quick else 'full'}/{model}/{scenario}/{system}"


def measure_cell(model: str, scenario: str, systems: list[str], *, quick: bool,
                 repeats: int, timeout: float, peer_threads: int) -> dict[str, dict]:
  """Starts one worker per system, then times `repeats` rounds of one run each."""
  os.makedirs(os.path.join(spec.cache_dir(), "logs"), exist_ok=True)
  workers, out = {}, {}
  try:
    for system in systems:
      extra = (["--threads", str(peer_threads)] if system == "trl" and peer_threads else [])
      if system == "trl" and scenario == "iteration":
        extra += ["--max-steps", str(repeats + 8)]
      log = os.path.join(spec.cache_dir(), "logs", f"{model}_{scenario}_{system}.log")
      print(f"  starting {system} ...", flush=True)
      start = time.perf_counter()
      cmd = worker_command(system, model, scenario, quick=quick, extra_args=extra)
      worker = Worker(system, cmd, log_path=log)
      try:
        info = worker.read(timeout)["info"]
      except (RuntimeError, TimeoutError) as e:
        worker.close()
        print(f"  {system} failed to start: {e}", flush=True)
        out[system] = {"error": str(e)}
        continue
      info["setup_s"] = round(time.perf_counter() - start, 1)
      workers[system] = worker
      out[system] = {"info": info, "times": [], "phases": []}
    for r in range(repeats):
      for system, worker in list(workers.items()):
        try:
          msg = worker.run(timeout)
        except (RuntimeError, TimeoutError) as e:
          print(f"  {system} failed: {e}", flush=True)
          out[system]["error"] = str(e)
          workers.pop(system).close()
          continue
        out[system]["times"].append(msg["seconds"])
        out[system]["phases"].append(msg["phases"])
        print(f"  repeat {r + 1}/{repeats} {system}: {msg['seconds']:.3f} s", flush=True)
  finally:
    for worker in workers.values():
      worker.close()
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  for res in out.values():
    res["stamp"] = stamp
    if res.get("times"):
      res["median"] = statistics.median(res["times"])
      names = res["phases"][0].keys()
      res["phase_medians"] = {k: statistics.median(p[k] for p in res["phases"])
                              for k in names}
  return out


def _fmt_s(x: float | None) -> str:
  return "" if x is None else f"{x:.3f}"


def render(results: dict, *, quick: bool, gflops: float | None, command: str) -> str:
  """The peers section: one table per scenario, ratios ours / peer, targets."""
  from benchmarks import harness
  from benchmarks.scenarios import grpo_iteration
  from egpo_jax.models import config as model_config

  w = spec.workload(quick)
  info = harness.machine_info()
  mode = "quick" if quick else "full"
  lines = [
      f"## {SECTION}", "",
      "egpo_jax against TRL and Tunix on the same model and the same work, each in its "
      "own virtualenv, timed round-robin in warm worker processes "
      "(`benchmarks/peers`, see benchmarks/README.md). \"peer / ours\" is the peer's "
      "median time over ours (> 1: we are faster).", "",
      f"Workload: B = {w.num_prompts} prompts x G = {w.group_size} samples, "
      f"{w.prompt_len}-token prompts, exactly {w.new_tokens} new tokens (EOS disabled), "
      "temperature 1, reward 1 if the completion contains token 7, GRPO advantages, "
      "token-mean clipped surrogate (clip 0.2), no KL, one AdamW step (lr 1e-6, "
      "grad-norm clip 1) per rollout batch, float32. Models: the same random "
      "Qwen2ForCausalLM safetensors in all three systems (`benchmarks.peers.model`): "
      "tiny (D 64, 2 layers, 4/2 heads, MLP 128, V 512, tied, 107k params) and small "
      "(D 512, 8 layers, 8/2 heads, MLP 1408, V 512, tied, 22.8M params).", "",
      f"Command: `{command}`  ",
      f"Machine: {info['cpu']}, {info['cores']} cores, backend {info['backend']} "
      f"({info['devices']}), Python {info['python']}  ",
      f"egpo_jax side: {info['versions']}" + (f"; jnp.dot 1024^3 float32 {gflops:.1f} "
                                               "GFLOP/s in this run" if gflops else ""),
  ]
  peer_versions = {}
  for key, res in results.items():
    if key.startswith(mode + "/") and "info" in res and not key.endswith("/ours"):
      peer_versions[res["info"]["system"]] = res["info"].get("versions", {})
  for system, versions in sorted(peer_versions.items()):
    lines[-1] += "  "
    lines.append(f"{system}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  for scenario in spec.SCENARIOS:
    rows = []
    for model in spec.MODELS:
      ours = results.get(_key(quick, model, scenario, "ours"), {})
      flops = None
      if scenario == "iteration":
        flops = grpo_iteration.iteration_flops(model_config.get_config(model), w)
      for system in spec.SYSTEMS:
        res = results.get(_key(quick, model, scenario, system))
        if res is None:
          continue
        if "median" not in res:
          rows.append(f"| {model} | {system} | failed: {res.get('error', '?')[:120]} "
                      "| | | | | | |")
          continue
        med, ph = res["median"], res["phase_medians"]
        name = res["info"]["system"]
        if "threads" in res["info"]:
          name += f" ({res['info']['threads']} torch thread{'s' * (res['info']['threads'] > 1)})"
        ratio, target = "", ""
        ours_med = res.get("ours_median", ours.get("median"))
        if system != "ours" and ours_med:
          speedup = med / ours_med
          ratio = f"{speedup:.2f}x"
          goal = TARGETS.get((model, system)) if scenario == "iteration" else None
          if goal:
            target = f">= {goal:g}x: " + ("met" if speedup >= goal else
                                          f"missed by {goal / speedup:.2f}x")
        rate = ""
        if scenario == "rollout":
          rate = f"{w.num_responses * w.new_tokens / med:.0f} tok/s"
        elif flops and gflops:
          rate = (f"{flops['iteration'] / med / 1e9:.1f} GFLOP/s, "
                  f"{med * gflops * 1e9 / flops['iteration']:.2f}x floor")
        rows.append(f"| {model} | {name} | {_fmt_s(med)} | {_fmt_s(ph.get('generation'))} "
                    f"| {_fmt_s(ph.get('update'))} | {rate} | {ratio} | {target} "
                    f"| {len(res['times'])} |")
    if rows:
      title = ("Rollout: B x G responses, seconds per rollout" if scenario == "rollout"
               else "One GRPO iteration (rollout + reward + one optimizer step), seconds")
      lines += ["", f"### {title}", "",
                "| model | system | median s | generation s | update s | rate | "
                "peer / ours | target | repeats |", "|---|---|---|---|---|---|---|---|---|",
                *rows]
  return "\n".join(lines)


def write_section(body: str, path: str) -> None:
  from benchmarks import run as bench_run
  doc = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  with open(path, "w") as f:
    f.write(bench_run._replace_section(doc, SECTION, body))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--setup", action="store_true", help="create venvs and model files")
  parser.add_argument("--quick", action="store_true", help="small workload, 2 repeats")
  parser.add_argument("--systems", default=",".join(spec.SYSTEMS))
  parser.add_argument("--models", default=",".join(spec.MODELS))
  parser.add_argument("--scenarios", default=",".join(spec.SCENARIOS))
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed rounds per cell (default: quick 2; tiny 7, small 3)")
  parser.add_argument("--resume", action="store_true",
                      help="skip systems whose cell already has results")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per answer")
  parser.add_argument("--peer-threads", type=int, default=0,
                      help="torch threads for TRL (0: torch's default)")
  parser.add_argument("--output", default=os.path.join(_ROOT, "BENCHMARKS.md"))
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)

  pick = lambda s: [x for x in s.split(",") if x]
  systems, models = pick(args.systems), pick(args.models)
  scenarios = pick(args.scenarios)
  for name, chosen, known in (("--systems", systems, spec.SYSTEMS),
                              ("--models", models, spec.MODELS),
                              ("--scenarios", scenarios, spec.SCENARIOS)):
    if set(chosen) - set(known):
      parser.error(f"{name}: unknown {sorted(set(chosen) - set(known))}; known {known}")

  from benchmarks.peers import model as peer_model
  if args.setup:
    for peer in systems:
      if peer != "ours":
        try:
          venvs.create(peer)
        except subprocess.CalledProcessError as e:
          print(f"{peer}: setup failed ({e}); it is skipped", flush=True)
  peer_model.ensure_models(models)
  for peer in [s for s in systems if s != "ours"]:
    if not venvs.is_ready(peer):
      print(f"{peer}: no venv at {venvs.venv_dir(peer)} (run with --setup); skipped")
      systems.remove(peer)

  results = load_results()
  for model in models:
    for scenario in scenarios:
      todo = [s for s in systems
              if not (args.resume and "median" in results.get(
                  _key(args.quick, model, scenario, s), {}))]
      if not todo:
        continue
      if "ours" not in todo and "ours" in systems:
        todo.insert(0, "ours")  # a peer's ratio is measured next to ours
      repeats = args.repeats or (2 if args.quick else (7 if model == "tiny" else 3))
      print(f"== {model} / {scenario}: {', '.join(todo)}, {repeats} repeats", flush=True)
      cell = measure_cell(model, scenario, todo, quick=args.quick, repeats=repeats,
                          timeout=args.timeout, peer_threads=args.peer_threads)
      ours_median = cell.get("ours", {}).get("median")
      for system, res in cell.items():
        if system != "ours" and ours_median:
          res["ours_median"] = ours_median  # the ratio is taken within this run
        results[_key(args.quick, model, scenario, system)] = res
      with open(results_path(), "w") as f:
        json.dump(results, f, indent=1)

  from benchmarks import harness
  gflops = harness.matmul_gflops()
  command = "python -m benchmarks.peers.compare " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
  body = render(results, quick=args.quick, gflops=gflops, command=command.strip())
  notes_path = os.path.join(os.path.dirname(__file__), "NOTES.md")
  if os.path.exists(notes_path):
    body += "\n\n" + open(notes_path).read().strip()
  print(body, flush=True)
  if not args.no_write:
    write_section(body, args.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())

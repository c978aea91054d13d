"""The peers harness without the peers: workload, FLOP counts, the worker protocol and
the round-robin orchestration (with fake workers), and the rendered table."""

import sys

import pytest

from benchmarks.peers import compare, spec
from benchmarks.scenarios import grpo_iteration
from egpo_jax.models import config as model_config


def test_prompts_are_fixed_word_tokens():
  w = spec.Workload()
  ids = w.prompt_ids()
  assert ids == spec.Workload().prompt_ids()
  assert len(ids) == w.num_prompts and {len(p) for p in ids} == {w.prompt_len}
  flat = {i for p in ids for i in p}
  assert min(flat) >= w.first_word_id and max(flat) < spec.VOCAB_SIZE
  assert w.target_id not in flat
  assert spec.prompt_text([3, 511]) == "w3 w511"
  quick = spec.workload(quick=True)
  assert quick.num_responses < w.num_responses and quick.new_tokens < w.new_tokens


def test_model_presets_match_the_benchmark_spec():
  for name, fields in spec.MODELS.items():
    hf = model_config.to_hf_dict(model_config.get_config(name))
    assert {k: hf[k] for k in fields} == fields
    assert hf["vocab_size"] == spec.VOCAB_SIZE and hf["tie_word_embeddings"]


def test_update_flops_by_hand():
  # One layer, D 4, 2/1 heads (head 2), MLP 8, V 16; n 1, P 2, T 3 -> L 5.
  config = model_config.ModelConfig(vocab_size=16, hidden_size=4, intermediate_size=8,
                                    num_layers=1, num_heads=2, num_kv_heads=1)
  per_token = 2 * (4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 8)   # q, k+v, o, MLP
  attention = 2 * 2 * 4 * 5 * 5                              # scores + values, L x L
  head = 2 * 4 * 16
  expected = 3 * (5 * per_token + attention) + 4 * 3 * head
  assert grpo_iteration.update_flops(config, 1, 2, 3) == expected
  assert grpo_iteration.update_flops(config, 7, 2, 3) == 7 * expected


def test_small_iteration_flops_near_the_issue_estimate():
  # The issue: ~950 GFLOP per small iteration (rollout ~230, update ~720), counted with
  # the prompt encoded per response; ours encodes it once per prompt.
  f = grpo_iteration.iteration_flops(model_config.get_config("small"), spec.Workload())
  assert 150e9 < f["rollout"] < 240e9
  assert 650e9 < f["update"] < 760e9
  assert f["iteration"] == f["rollout"] + f["update"]


# A worker that answers like a runner: its "time" is its system's fixed cost.
_FAKE = """
import sys
from benchmarks.peers import spec
cost = float(sys.argv[1])
if cost < 0:
  raise SystemExit(3)
spec.serve(lambda: None, lambda: (cost, {"generation": cost / 4, "update": 3 * cost / 4}),
           {"system": "fake " + sys.argv[2], "versions": {"fake": "1"}})
"""


@pytest.fixture
def fake_workers(monkeypatch, tmp_path):
  monkeypatch.setenv("EGPO_PEERS_HOME", str(tmp_path))
  costs = {"ours": 0.5, "trl": 6.0, "tunix": -1.0}
  monkeypatch.setattr(compare, "worker_command",
                      lambda system, model, scenario, *, quick, extra_args:
                      [sys.executable, "-c", _FAKE, str(costs[system]), system])
  return costs


def test_round_robin_cell_and_failed_start(fake_workers):
  cell = compare.measure_cell("tiny", "iteration", ["ours", "trl", "tunix"], quick=True,
                              repeats=3, timeout=60, peer_threads=0)
  assert cell["ours"]["times"] == [0.5] * 3 and cell["ours"]["median"] == 0.5
  assert cell["trl"]["phase_medians"] == {"generation": 1.5, "update": 4.5}
  assert cell["trl"]["info"]["system"] == "fake trl"
  assert "median" not in cell["tunix"] and "exited with 3" in cell["tunix"]["error"]


def test_render_ratios_and_targets(fake_workers):
  results = {}
  for model in ("tiny", "small"):
    cell = compare.measure_cell(model, "iteration", ["ours", "trl"], quick=False,
                                repeats=1, timeout=60, peer_threads=0)
    results.update({compare._key(False, model, "iteration", s): r for s, r in cell.items()})
  results[compare._key(False, "tiny", "iteration", "tunix")] = {"error": "no venv"}
  text = compare.render(results, quick=False, gflops=100.0, command="cmd")
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
          if line.startswith("| tiny") or line.startswith("| small")}
  # 6.0 / 0.5 = 12x: tiny's >= 10x target met, small's >= 1.3x too.
  assert "12.00x" in rows[("tiny", "fake trl")] and "met" in rows[("tiny", "fake trl")]
  assert "missed" not in rows[("small", "fake trl")]
  assert "failed: no venv" in rows[("tiny", "tunix")]
  assert "GFLOP/s" in rows[("small", "fake ours")]


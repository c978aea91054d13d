"""Per-record response caps (task.max_new_tokens_field) and the load-time checks on the
training JSONL: bad caps and prompts without room in the model's positions are bad
records, named by file line; host mode on continuous batching stops each capped record's
responses at its cap; both updates refuse bfloat16 master params."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpo_jax.data import records
from egpo_jax.models import transformer
from egpo_jax.models.byte_tokenizer import ByteTokenizer
from egpo_jax.models.config import get_config
from egpo_jax.sampling import continuous, engine
from egpo_jax.training import config as config_lib
from egpo_jax.training import host_loop, iteration, tasks, update
from egpo_jax.training.optimizer import make_optimizer
from egpo_jax.types import RolloutBatch, TrainState
from experiments.configs import default

T = 8


def _line(problem, answer, **extra):
  return json.dumps({"problem": problem, "answer": answer, **extra})


# file line -> content; the plain template on the byte tokenizer: a token per character.
LINES = {
    1: _line("1+1=", "2"),
    2: _line("2+1=", "3", budget=3),
    3: _line("3+1=", "4", budget=0),
    4: _line("4+1=", "5", budget="ten"),
    5: _line("5+1=", "6", budget=2.0),
    6: _line("6+1=", "7", budget=True),
    7: _line("7+1=", "8", budget=T + 1),
    8: _line("8+1=", "9", budget=None),
    9: _line("1234567890123+1=", "1"),       # 16 tokens: 16 + T = 24 > 20 positions
    10: _line("12345678901234567+1=", "1"),  # 20 tokens > max_prompt_len = 16
    11: _line("9+1=", "10", budget=T),
    12: _line("10+1=", "11", budget=5),
}
BAD = {3: "field 'budget' is 0, expected a positive int",
       4: "field 'budget' is 'ten', expected a positive int",
       5: "field 'budget' is 2.0, expected a positive int",
       6: "field 'budget' is True, expected a positive int",
       7: f"field 'budget' is {T + 1}, over rollout.max_new_tokens={T}",
       9: f"prompt has 16 tokens: with rollout.max_new_tokens={T} that is 24 positions, "
          "over the model's max_position_embeddings=20",
       10: "prompt has 20 tokens, over max_prompt_len=16"}
# The kept records' caps, by answer: their own, else T.
CAPS = {"2": T, "3": 3, "9": T, "10": T, "11": 5}


@pytest.fixture
def train_file(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(LINES[i] for i in sorted(LINES)) + "\n")
  return str(path)


def _config(train_file, **overrides):
  return config_lib.with_overrides(default.get_config(), {
      "task.name": "jsonl", "task.train_file": train_file, "task.reward": "math",
      "task.max_prompt_len": 16, "rollout.prompts_per_batch": 1,
      "rollout.max_new_tokens": T, "task.max_new_tokens_field": "budget", **overrides})


def _task(train_file, max_positions=20, **overrides):
  return tasks.JsonlTask(_config(train_file, **overrides), ByteTokenizer(), seed=0,
                         shard_index=0, shard_count=1, max_positions=max_positions)


def test_skip_drops_only_the_bad_lines_and_names_them(train_file):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    task = _task(train_file)
  bad = [str(w.message) for w in caught if issubclass(w.category, records.BadRecordWarning)]
  assert len(bad) == 1, bad
  assert f"{len(BAD)} of {len(LINES)} records are bad" in bad[0]
  for line, reason in BAD.items():
    assert f"line {line}" in bad[0] and reason in bad[0], (line, bad[0])
  report = task.report_json()
  assert report["bad_lines"] == sorted(BAD)
  assert report["kept"] == len(LINES) - len(BAD) == len(CAPS)
  # One epoch of batches of one: every kept record once, with its own cap (else T).
  seen = {}
  for _ in range(len(CAPS)):
    ids, mask, answers, caps_B = task.sample_prompts(None, 1)
    assert ids.shape == (1, 16) and caps_B.dtype == np.int32
    seen[answers[0]] = int(caps_B[0])
  assert seen == CAPS


def test_raise_refuses_in_one_line_naming_file_line_and_field(train_file):
  with pytest.raises(records.RecordError) as err:
    _task(train_file, **{"task.on_bad_record": "raise"})
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(train_file + ": 7 of 12 records are bad")
  assert "line 3: field 'budget' is 0, expected a positive int" in message
  assert f"line 7 (id 6): field 'budget' is {T + 1}, over rollout.max_new_tokens" in message


def test_without_the_field_every_response_gets_max_new_tokens(train_file):
  with pytest.warns(records.BadRecordWarning):
    task = _task(train_file, **{"task.max_new_tokens_field": ""})
  assert task.read_report.to_json()["bad_lines"] == [9, 10]   # only the prompts
  out = task.sample_prompts(None, 1)
  assert len(out) == 3   # no caps: the static sampler's interface
  # Without the model's positions the prompt of line 9 is kept.
  with pytest.warns(records.BadRecordWarning):
    task = _task(train_file, max_positions=None)
  assert task.read_report.to_json()["bad_lines"] == [3, 4, 5, 6, 7, 10]


def test_config_refuses_caps_on_the_static_sampler(train_file):
  c = _config(train_file, **{"warmup.steps": 0})
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config.task.max_new_tokens_field='budget': per-record "
                           r"response caps need continuous batching: set rollout.slots"):
    config_lib.validate(c, inputs_exist=False)
  config_lib.validate(config_lib.with_overrides(c, {"rollout.slots": 4}), inputs_exist=False)


# ------------------------------------------------------------------ host mode, capped

CFG = get_config("tiny")
OPT = make_optimizer(lr=1e-3)
HOST_T, G = 12, 2
HOST_CAPS = {"a": 3, "b": None, "c": 5, "d": None}   # answer -> the record's cap


def test_host_mode_stops_capped_records_at_their_caps(tmp_path):
  path = tmp_path / "caps.jsonl"
  path.write_text("".join(_line(f"{i}+{i}=", a, **({"budget": cap} if cap else {})) + "\n"
                          for i, (a, cap) in enumerate(HOST_CAPS.items())))
  c = _config(str(path), **{"rollout.prompts_per_batch": 4, "rollout.max_new_tokens": HOST_T,
                            "rollout.group_size": G})
  task = tasks.JsonlTask(c, ByteTokenizer(), seed=0, shard_index=0, shard_count=1,
                         max_positions=CFG.max_position_embeddings)
  lengths = {a: [] for a in HOST_CAPS}

  def score(ids, mask, answers):
    for m, a in zip(mask, answers):
      lengths[a].append(int(m.sum()))
    return np.asarray([a in "ab" for a in answers])

  # No stop token: every response runs to its cap.
  spec = engine.SamplingSpec(group_size=G, max_new_tokens=HOST_T, eos_ids=())
  settings = iteration.IterationSettings(prompts_per_batch=4, sampling=spec,
                                         update=update.UpdateSettings())
  params = transformer.init_params(CFG, jax.random.PRNGKey(0))
  state = TrainState.create(params, OPT.init(params))
  rollout = continuous.HostRollout(CFG, continuous.ContinuousSpec(spec, slots=3),
                                   chunk_steps=4)
  run = lambda r: host_loop.host_iteration(
      state, jax.random.PRNGKey(1), iteration.AlgoArrays.create("egpo"),
      task=host_loop.HostTask(task.sample_prompts, score), model_config=CFG,
      optimizer=OPT, settings=settings, rollout=r)
  _, metrics = run(rollout)
  assert lengths == {a: [cap or HOST_T] * G for a, cap in HOST_CAPS.items()}
  assert np.isfinite(metrics["loss"])
  # The static sampler cannot cap rows: refused, naming the field.
  with pytest.raises(ValueError, match="task.max_new_tokens_field.*rollout.slots > 0"):
    run(None)


# ------------------------------------------------------------ bfloat16 master params

def _batch(n=4, p=4, t=8):
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  return RolloutBatch(
      prompt_ids_NxP=jax.random.randint(k[0], (n, p), 3, 300),
      prompt_mask_NxP=jnp.ones((n, p), bool),
      completion_ids_NxT=jax.random.randint(k[1], (n, t), 3, 300),
      completion_mask_NxT=jnp.ones((n, t), bool), old_logps_NxT=jnp.full((n, t), -6.2),
      adv_N=jax.random.normal(k[2], (n,)), ref_logps_NxT=jnp.zeros((n, t)),
      is_weights_NxT=jnp.ones((n, t)))


@pytest.mark.parametrize("fn", [update.update, update.bucketed_update],
                         ids=["update", "bucketed_update"])
def test_both_updates_refuse_bfloat16_master_params(fn):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        transformer.init_params(CFG, jax.random.PRNGKey(0)))
  state = TrainState.create(params, OPT.init(params))
  with pytest.raises(ValueError, match=rf"^{fn.__name__}: the trained params are bfloat16; "
                                       r"train float32 master params \(ModelConfig."
                                       r"param_dtype='float32'"):
    fn(state, _batch(), jax.random.PRNGKey(0), optimizer=OPT, model_config=CFG,
       settings=update.UpdateSettings(length_buckets=2))


# ------------------------------------------------------------------ the trainer, capped

@pytest.mark.slow
@pytest.mark.parametrize("field", ["budget", ""], ids=["capped", "uncapped"])
def test_trainer_caps_every_response_of_capped_records(tmp_path, write_user_files, field):
  """train.train end to end (config -> JsonlTask -> host_iteration -> HostRollout): with
  every record capped at 2 tokens, no iteration decodes more than 2 per response."""
  from egpo_jax.training import train as train_lib  # pylint: disable=import-outside-toplevel
  from egpo_jax.training.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
  model_dir, train_file = write_user_files(tmp_path, 8)
  with open(train_file) as f:
    lines = [json.loads(line) for line in f]
  with open(train_file, "w") as f:
    f.writelines(json.dumps({**rec, "budget": 2}) + "\n" for rec in lines)
  b, g = 4, 4
  c = config_lib.with_overrides(default.get_config(), {
      "model.preset": "hf", "model.path": model_dir, "task.name": "jsonl",
      "task.train_file": train_file, "task.reward": "math", "task.max_prompt_len": 32,
      "task.max_new_tokens_field": field, "rollout.prompts_per_batch": b,
      "rollout.group_size": g, "rollout.max_new_tokens": T, "rollout.slots": 8,
      "warmup.steps": 0, "train.iterations": 2, "train.tensorboard": False})
  train_lib.train(c, str(tmp_path / "run"), progress=False)
  tokens = [r["rollout_tokens"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))]
  assert len(tokens) == 2
  if field:
    assert all(0 < t <= 2 * b * g for t in tokens), tokens
  else:   # the random model rarely emits its EOS: responses run to T
    assert all(t > 2 * b * g for t in tokens), tokens

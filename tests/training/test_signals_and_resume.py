"""In-process checks of the stop-and-resume machinery: signals -> exit codes, warm-up
chunks equal to one scan, chunk boundaries at validations, and a resumed metrics writer
that logs no iteration twice (JSONL and TensorBoard)."""

import glob
import os
import signal
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from egpo_jax.models import transformer
from egpo_jax.training import config as config_lib
from egpo_jax.training import metrics as metrics_lib
from egpo_jax.training import preemption
from egpo_jax.training import experiment, warmup
from egpo_jax.training import train as train_lib
from egpo_jax.training.checkpointing import Checkpointer
from egpo_jax.types import TrainState
from experiments.configs import tiny


def _stop_and_save(tmp_path, *signals):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  with preemption.sigterm_guard():
    assert not preemption.stop_requested(1)
    for s in signals:
      os.kill(os.getpid(), s)
    assert preemption.stop_requested(2)
    with pytest.raises(preemption.Preempted) as info:
      preemption.checkpoint_and_raise(2, ckpt, {"w": jnp.ones(3)}, {"iteration": 2})
  return info.value


def test_sigint_saves_and_exits_130_and_sigterm_75(tmp_path, capfd):
  previous = signal.getsignal(signal.SIGINT)
  err = _stop_and_save(tmp_path / "a", signal.SIGINT)
  assert err.exit_code == preemption.INTERRUPTED_EXIT_CODE == 130
  assert str(err).startswith("interrupted (Ctrl-C): stopped after iteration 2 and saved ")
  assert err.checkpoint_path == str(tmp_path / "a" / "ckpt" / "2")
  assert "Ctrl-C: saving a checkpoint at the next boundary" in capfd.readouterr().err
  assert signal.getsignal(signal.SIGINT) is previous
  # SIGTERM (with or without a Ctrl-C) is a preemption: run again.
  assert _stop_and_save(tmp_path / "b", signal.SIGINT, signal.SIGTERM).exit_code == 75
  assert _stop_and_save(tmp_path / "c", signal.SIGTERM).exit_code == 75


def test_a_stop_at_the_jax_sync_point_is_a_preemption(tmp_path, monkeypatch):
  """Multi-process: JAX's notifier took SIGTERM, no local flag is set: exit 75, not 130."""
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(ocp.multihost, "reached_preemption", lambda step: step >= 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", np.asarray)
  assert _stop_and_save(tmp_path).exit_code == 75


def test_the_second_ctrl_c_aborts_even_after_a_sigterm(monkeypatch, capfd):
  exits = []
  monkeypatch.setattr(os, "_exit", exits.append)
  with preemption.sigterm_guard():
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGINT):
      os.kill(os.getpid(), s)
  assert exits == [130]
  assert "second Ctrl-C: aborted" in capfd.readouterr().err


def test_a_signal_in_the_warmup_stops_at_its_next_chunk(monkeypatch):
  c = config_lib.with_overrides(tiny.get_config(), {"warmup.steps": 6})
  exp = experiment.build(c)
  state = TrainState.create(transformer.init_params(exp.model_config, jax.random.PRNGKey(0)),
                            None)
  steps = []
  monkeypatch.setattr(preemption, "stop_requested",
                      lambda step, warmup=False: steps.append((step, warmup)) or step >= 4)
  with pytest.raises(preemption.Preempted, match="warm-up after step 4 of 6") as info:
    warmup.sft_warm_up(state, jax.random.PRNGKey(1), exp, c, steps_per_call=2)
  assert steps == [(2, True), (4, True)] and info.value.checkpoint_path is None


@pytest.mark.slow
def test_warmup_in_chunks_is_bitwise_one_scan():
  c = config_lib.with_overrides(tiny.get_config(), {"warmup.steps": 6})
  exp = experiment.build(c)
  state = TrainState.create(transformer.init_params(exp.model_config, jax.random.PRNGKey(0)),
                            None)
  whole, info_whole = warmup.sft_warm_up(state, jax.random.PRNGKey(1), exp, c,
                                        steps_per_call=6)
  parts, info_parts = warmup.sft_warm_up(state, jax.random.PRNGKey(1), exp, c,
                                        steps_per_call=4)   # chunks of 4 and 2
  chex.assert_trees_all_equal(whole.params, parts.params)
  chex.assert_trees_all_equal(whole.opt_state, parts.opt_state)
  assert info_whole["first_loss"] == info_parts["first_loss"]
  assert info_whole["final_loss"] == info_parts["final_loss"]


def test_chunks_end_at_checkpoints_validations_and_multiples_of_k():
  ends, it = [], 0
  while it < 20:
    it = train_lib.chunk_end(it, 20, 4, 10, 6)
    ends.append(it)
  assert ends == [4, 6, 8, 10, 12, 16, 18, 20]
  assert train_lib.chunk_end(3, 20, 4, 10, 0) == 4


@pytest.mark.slow
def test_validations_run_on_multiples_of_eval_every_that_are_not_chunk_ends(tmp_path):
  c = config_lib.with_overrides(tiny.get_config(), {
      "train.iterations": 4, "train.iterations_per_call": 4, "train.checkpoint_every": 4,
      "train.eval_every": 3, "warmup.steps": 0})
  train_lib.train(c, str(tmp_path), progress=False)
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in rows if "val_accuracy" in r] == [3, 4]   # 4: the last


def _tensorboard_events(logdir):
  """Every event of the TFRecord files under `logdir`, oldest file first."""
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                 key=lambda p: (int(os.path.basename(p).split(".")[3]), os.path.getmtime(p)))
  events = []
  for path in files:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return events


def _scalars(events, tag, *, purge: bool):
  """{step: [values]} of `tag`; `purge` applies TensorBoard's rule: a SessionLog START at
  step s hides the earlier events at steps >= s."""
  seen = {}
  for e in events:
    if purge and e.HasField("session_log") and e.session_log.status == e.session_log.START:
      seen = {s: v for s, v in seen.items() if s < e.step}
    for v in e.summary.value:
      if v.tag == tag:
        seen.setdefault(e.step, []).append(v.simple_value)
  return seen


def test_a_resumed_writer_logs_no_iteration_twice(tmp_path):
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=True)
  for step in range(1, 6):
    w.write(step, {"loss": float(step)})
  w.close()
  # Resumed from a checkpoint at 3: iterations 4 and 5 are recomputed (other values).
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=True, resume_after=3)
  for step in (4, 5, 6):
    w.write(step, {"loss": 10.0 * step})
  w.close()
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
                                                    (5, 50.0), (6, 60.0)]
  events = _tensorboard_events(os.path.join(tmp_path, "tensorboard"))
  assert _scalars(events, "loss", purge=False)[4] == [4.0, 40.0]   # both are in the files
  assert _scalars(events, "loss", purge=True) == {1: [1.0], 2: [2.0], 3: [3.0], 4: [40.0],
                                                  5: [50.0], 6: [60.0]}

"""In-process checks of checkpoint integrity, quarantine, the SIGTERM guard and the
fault-injection parser (the subprocess kill tests are in test_faults.py)."""

import errno
import glob
import logging
import os
import signal

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from egpo_jax.training import checkpointing, fault_injection, preemption
from egpo_jax.training.checkpointing import (CheckpointMismatchError, Checkpointer,
                                             CorruptCheckpointError)

# When one array of a damaged checkpoint fails to read, orbax drops the other arrays'
# pending read coroutines; Python reports them when they are collected, in any later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(scale=1.0):
  return {"params": {"w": jnp.arange(4096, dtype=jnp.float32) * scale,
                     "h": jnp.full((3, 5), scale, jnp.bfloat16)},
          "count": jnp.asarray(7, jnp.int32), "rng": jax.random.PRNGKey(3)}


def _saved(directory, steps=(0, 1, 2)):
  ckpt = Checkpointer(str(directory), max_to_keep=10)
  for s in steps:
    ckpt.save(s, _tree(float(s + 1)), {"iteration": s}, force=True)
  ckpt.close()
  return Checkpointer(str(directory), max_to_keep=10)


def _largest_state_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip_bytes(path, n=8):
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
  open(path, "wb").write(bytes(data))


CORRUPTIONS = {
    "garbled array bytes": lambda d: _flip_bytes(_largest_state_file(d)),
    "truncated array file": lambda d: os.truncate(_largest_state_file(d), 10),
    "top commit marker deleted": lambda d: os.remove(os.path.join(d, "commit_success.txt")),
    "item commit marker deleted": lambda d: os.remove(
        os.path.join(d, "state", "commit_success.txt")),
    "extra json cut off": lambda d: open(os.path.join(d, "extra", "metadata"), "w").write(
        '{"iteration": '),
    "tree metadata cut off": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write(
        '{"tree_metadata": '),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_named_quarantined_and_skipped(tmp_path, caplog,
                                                                    corruption):
  ckpt = _saved(tmp_path / "ckpt")
  bad = ckpt.step_path(2)
  CORRUPTIONS[corruption](bad)
  with pytest.raises(CorruptCheckpointError, match=f"checkpoint {bad} is incomplete"):
    ckpt.restore(2, _tree())
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    step, state, extra = ckpt.restore_latest(_tree())
  assert step == 1 and extra == {"iteration": 1}
  chex.assert_trees_all_equal(state, _tree(2.0))
  assert f"checkpoint {bad} is incomplete or corrupt" in caplog.text
  moved = glob.glob(os.path.join(ckpt.quarantine_directory, "2-*"))
  assert len(moved) == 1 and moved[0] in caplog.text
  assert ckpt.all_steps() == [0, 1] and not os.path.exists(bad)
  # The resumed run can write that step again.
  ckpt.save(2, _tree(5.0), {"iteration": 2})
  ckpt.wait()
  chex.assert_trees_all_equal(ckpt.restore(2, _tree())[0], _tree(5.0))
  ckpt.close()


def test_every_checkpoint_bad_returns_none_and_without_quarantine_nothing_moves(tmp_path):
  ckpt = _saved(tmp_path / "ckpt", steps=(0, 1))
  for s in (0, 1):
    os.remove(os.path.join(ckpt.step_path(s), "commit_success.txt"))
  assert ckpt.restore_latest(_tree(), quarantine=False) is None
  assert ckpt.all_steps() == [0, 1] and not os.path.exists(ckpt.quarantine_directory)
  ckpt.close()


def test_a_different_tree_is_a_mismatch_not_corruption(tmp_path):
  ckpt = _saved(tmp_path / "ckpt", steps=(0,))
  other = _tree()
  other["params"]["w"] = jnp.zeros(10)
  with pytest.raises(CheckpointMismatchError, match=r"leaf params/w: stored \(4096,\), "
                     r"expected \(10,\)"):
    ckpt.restore_latest(other)
  assert ckpt.all_steps() == [0]   # nothing quarantined
  ckpt.close()


def _listing(directory):
  """(path, size) of every file under `directory`."""
  files = [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names]
  return sorted((os.path.relpath(f, directory), os.path.getsize(f)) for f in files)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_the_read_only_reader_names_a_damaged_step_and_its_neighbours_and_moves_nothing(
    tmp_path, corruption):
  directory = str(tmp_path / "ckpt")
  _saved(directory).close()
  CORRUPTIONS[corruption](os.path.join(directory, "2"))
  before = _listing(directory)
  read = lambda path: checkpointing.read_state(path, _tree())
  with pytest.raises(CorruptCheckpointError, match=r"2 is incomplete.*one of \[0, 1\]"):
    checkpointing.read_step(directory, None, read)   # the newest, never a silent fallback
  step, (state, extra) = checkpointing.read_step(directory, 1, read)
  assert step == 1 and extra == {"iteration": 1}
  chex.assert_trees_all_equal(state, _tree(2.0))
  assert _listing(directory) == before and not os.path.exists(directory + ".quarantine")


def test_the_read_only_reader_picks_the_newest_step_and_names_missing_ones(tmp_path):
  directory = str(tmp_path / "ckpt")
  _saved(directory).close()
  read = lambda path: checkpointing.read_state(path, _tree())
  step, (state, _) = checkpointing.read_step(directory, None, read)
  assert step == 2
  chex.assert_trees_all_equal(state, _tree(3.0))
  with pytest.raises(FileNotFoundError, match=r"--step=5: .*found steps \[0, 1, 2\]"):
    checkpointing.read_step(directory, 5, read)
  with pytest.raises(FileNotFoundError, match="no checkpoint step folder"):
    checkpointing.read_step(str(tmp_path / "empty"), None, read)
  other = _tree()
  other["params"]["w"] = jnp.zeros(10)
  with pytest.raises(CheckpointMismatchError, match=r"leaf params/w: stored \(4096,\), "
                     r"expected \(10,\)"):
    checkpointing.read_state(os.path.join(directory, "0"), other)


def _raised_from(cause):
  try:
    raise cause
  except Exception as err:  # noqa: BLE001 - rewrapped as orbax's async readers do
    try:
      raise RuntimeError("restore of item 'state' failed") from err
    except RuntimeError as wrapped:
      return wrapped


ENVIRONMENT_ERRORS = {
    "permission denied": PermissionError(errno.EACCES, "Permission denied"),
    "out of memory": MemoryError(),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    "tensorstore permission status": ValueError(
        "PERMISSION_DENIED: Error opening \"zarr3\" driver: [source locations='...']"),
    "storage service unavailable": ValueError("UNAVAILABLE: GCS request failed"),
    "wrapped timeout": _raised_from(TimeoutError("read timed out")),
}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT_ERRORS))
def test_an_environment_failure_propagates_and_quarantines_nothing(tmp_path, monkeypatch,
                                                                   name):
  """Permission, memory, disk or storage-service failures are not the checkpoint's fault:
  restore and restore_latest re-raise them, and every step stays where it is."""
  ckpt = _saved(tmp_path / "ckpt", steps=(0, 1))
  error = ENVIRONMENT_ERRORS[name]
  assert checkpointing.is_environment_error(error)

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt._manager, "restore", fail)
  with pytest.raises(type(error)) as raised:
    ckpt.restore_latest(_tree())
  assert raised.value is error and not isinstance(raised.value, CorruptCheckpointError)
  assert ckpt.all_steps() == [0, 1] and not os.path.exists(ckpt.quarantine_directory)
  monkeypatch.undo()   # the storage is back: the newest step restores
  assert ckpt.restore_latest(_tree())[0] == 1
  ckpt.close()


def test_content_errors_are_not_environment_errors():
  for err in (ValueError("DATA_LOSS: checksum"), FileNotFoundError(errno.ENOENT, "gone"),
              ValueError("NOT_FOUND: Error opening"), _raised_from(KeyError("params")),
              OSError(errno.EIO, "Input/output error")):
    assert not checkpointing.is_environment_error(err), err


def test_a_save_killed_midway_leaves_only_a_temporary_folder_that_is_cleaned(tmp_path):
  ckpt = _saved(tmp_path / "ckpt", steps=(0,))
  ckpt.close()
  tmp = tmp_path / "ckpt" / "1.orbax-checkpoint-tmp-1234"
  tmp.mkdir()
  (tmp / "partial").write_bytes(b"\0" * 100)
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.all_steps() == [0]
  assert ckpt.restore_latest(_tree())[0] == 0
  ckpt.close()   # orbax deletes temporary folders in the background; close waits
  assert not tmp.exists()


def test_extra_key_for_the_fingerprint_is_reserved(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(ValueError, match="reserved"):
    ckpt.save(0, _tree(), {"_integrity": 1})
  ckpt.close()


def test_fingerprint_sees_every_word_and_ignores_layout(num_devices):
  tree = _tree()
  base = checkpointing.fingerprint(tree)
  assert set(base) == {"params/w", "params/h", "count", "rng"}
  assert base["params/h"][0] == "bfloat16"
  for i in (0, 1, 2047, 4095):   # one element changed by one ulp
    w = tree["params"]["w"].at[i].set(jnp.nextafter(tree["params"]["w"][i], jnp.inf))
    changed = checkpointing.fingerprint({**tree, "params": {**tree["params"], "w": w}})
    assert changed["params/w"][1:] != base["params/w"][1:]
    assert {k: v for k, v in changed.items() if k != "params/w"} == {
        k: v for k, v in base.items() if k != "params/w"}
  # Swapping two elements changes it too (position-weighted).
  w = tree["params"]["w"].at[jnp.array([1, 2])].set(tree["params"]["w"][jnp.array([2, 1])])
  assert checkpointing.fingerprint({"w": w}) != checkpointing.fingerprint(
      {"w": tree["params"]["w"]})
  # The same values sharded over 8 devices give the same fingerprint.
  mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(tree["params"]["w"], NamedSharding(mesh, P("x")))
  assert checkpointing.fingerprint({"w": sharded}) == checkpointing.fingerprint(
      {"w": tree["params"]["w"]})
  # Typed PRNG keys are hashed through their key data.
  assert checkpointing.fingerprint({"k": jax.random.key(3)})["k"][1:] == base["rng"][1:]


def test_sigterm_guard_sets_a_flag_and_restores_the_previous_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.sigterm_guard():
    assert not preemption.stop_requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.signalled() and preemption.stop_requested(2)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not preemption.signalled()


def test_multiprocess_jobs_stop_at_jax_preemption_sync_point(monkeypatch):
  """With jax.distributed up, JAX's notifier keeps SIGTERM and every process asks the
  sync point with the same increasing step ids (one per chunk boundary)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(ocp.multihost, "reached_preemption",
                      lambda step: calls.append(step) or step == 2)
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.sigterm_guard():
    assert signal.getsignal(signal.SIGTERM) is previous
    assert [preemption.stop_requested(it) for it in (4, 6)] == [False, True]
  assert calls == [1, 2]
  # A flag set by this module's handler (preemption service off) also stops the job.
  monkeypatch.setattr(ocp.multihost, "reached_preemption", lambda step: False)
  with preemption.sigterm_guard():
    assert not preemption.stop_requested(1)
    preemption._on_sigterm(signal.SIGTERM, None)
    assert preemption.stop_requested(2)


def test_checkpoint_and_raise_saves_the_iteration_once(tmp_path):
  ckpt = _saved(tmp_path / "ckpt", steps=(0, 2))
  with pytest.raises(preemption.Preempted, match="stopped after iteration 3") as info:
    preemption.checkpoint_and_raise(3, ckpt, _tree(9.0), {"iteration": 3})
  assert info.value.checkpoint_path == str(tmp_path / "ckpt" / "3")
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.all_steps() == [0, 2, 3]
  chex.assert_trees_all_equal(ckpt.restore(3, _tree())[0], _tree(9.0))
  # Already saved at that iteration: not saved twice, still raises.
  with pytest.raises(preemption.Preempted):
    preemption.checkpoint_and_raise(3, ckpt, _tree(1.0), {"iteration": 3})
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  chex.assert_trees_all_equal(ckpt.restore(3, _tree())[0], _tree(9.0))
  ckpt.close()


def test_honours_sigterm_wraps_and_keeps_the_signature():
  @preemption.honours_sigterm
  def job(x, *, y=1):
    """Doc."""
    return signal.getsignal(signal.SIGTERM), x + y

  handler, value = job(1, y=2)
  assert value == 3 and handler is not signal.getsignal(signal.SIGTERM)
  assert job.__doc__ == "Doc." and job.__name__ == "job"


def test_fault_injection_spec_is_parsed_strictly():
  assert fault_injection.parse("") == {}
  assert fault_injection.parse("sigkill_after_iteration=3, sigkill_during_save=4") == {
      "sigkill_after_iteration": 3, "sigkill_during_save": 4}
  with pytest.raises(ValueError, match="EGPO_FAULT_INJECT"):
    fault_injection.parse("sigkill_somewhere=3")
  with pytest.raises(ValueError, match="needs an integer"):
    fault_injection.parse("sigkill_during_save=four")

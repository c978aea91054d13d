"""Orbax checkpoints of the train state plus JSON metadata (config, data iterator, counters).

Layout of `<workdir>/checkpoints/<step>/`: item `state` (StandardSave of the TrainState
pytree, whose `params` field the HF exporter reads) and item `extra` (JsonSave: config,
data iterator state, host counters, and a fingerprint of `state`). Saves are asynchronous.

Fault tolerance. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a process killed mid-save leaves only a temporary folder, which the
next start deletes (`cleanup_tmp_directories`). On top of that, `restore` rejects a step
  * without its commit markers (`commit_success.txt` at the top and in each item),
  * whose files cannot be read (truncated, deleted, unparsable), or
  * whose restored values do not match the fingerprint taken at save time (garbled
    bytes that still decode: orbax stores raw, unchecksummed array chunks),
with `CorruptCheckpointError` naming its path. `restore_latest` walks back from the newest
step past such checkpoints, warns with each bad path, and moves each one aside into
`<directory>.quarantine/<step>-<time>/`, so that the resumed run can save that step
again and the retention policy never counts a bad step as one of the kept ones. Nothing
is deleted: a quarantined folder can be inspected or moved back by hand.

Read-only reading. `read_params` is the reader of evaluation and export: it opens one
step folder directly (no CheckpointManager, which would delete temporary folders of a
run still saving), applies the same checks as `restore` (commit markers, then the
save-time fingerprint of every array it restores), restores only the params (never the
optimizer state) onto the given shardings, and raises CorruptCheckpointError without
moving, deleting or writing anything. `read_state` does the same for the whole saved
state (a finished run's train state, for tests and analysis); `read_step` is the one way
a tool picks a step folder (the newest, or a given one; a damaged step is an error
naming the others); `step_folders` lists a folder's steps likewise.

A checkpoint whose stored tree differs from the one the job restores (another config or
code version) is not corrupt: `restore` raises `CheckpointMismatchError` naming the first
differing leaf, and `restore_latest` lets it propagate rather than discarding progress.
Nor is a failure of the machine or the storage around a checkpoint (permission denied,
out of memory, disk or file handles, a storage service unavailable or timing out:
`is_environment_error`): it propagates unchanged from both, nothing is quarantined, and
the same restore can be retried once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from egpo_jax.training import fault_injection

log = logging.getLogger(__name__)

ITEMS = ("state", "extra")
COMMIT_MARKER = "commit_success.txt"
_INTEGRITY_KEY = "_integrity"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint on disk is incomplete or damaged."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"checkpoint {path} is incomplete or corrupt: {reason}")
    self.path = path
    self.reason = reason


class CheckpointMismatchError(ValueError):
  """A sound checkpoint holds a different tree than the one being restored."""


# What a read-only tool reports as one line and exit code 2: the user can fix these
# (another path, step or flag; an --out they may write, e.g. for a read-only workdir);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, PermissionError, ValueError, CorruptCheckpointError)


def run_tool(fn: Callable[..., Any], *args) -> tuple[Any, int]:
  """(fn(*args), 0), or (None, 2) after printing a USER_ERRORS error as one line."""
  try:
    return fn(*args), 0
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return None, 2


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _words_u32(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector (one word per element, two for 64-bit)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_hashes(leaves: list[jax.Array]) -> jax.Array:
  """Two position-weighted wrapping sums of each leaf's bits: uint32[num_leaves, 2].

  Odd multipliers make any change of a single word change both sums; integer addition
  is associative, so the result does not depend on sharding or reduction order.
  """
  out = []
  for x in leaves:
    w = _words_u32(x)
    i = jax.lax.iota(jnp.uint32, w.shape[0])
    h1 = jnp.sum(w * ((i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)), dtype=jnp.uint32)
    mixed = w ^ (w >> 15)
    h2 = jnp.sum(mixed * ((i * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F))
                          | jnp.uint32(1)), dtype=jnp.uint32)
    out.append(jnp.stack([h1, h2]))
  return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> dict[str, list]:
  """{leaf path: [dtype name, hash1, hash2]} of a pytree of arrays (computed on device)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  hashes = np.asarray(jax.device_get(_leaf_hashes([x for _, x in flat])))
  return {_path_key(p): [str(x.dtype), int(h[0]), int(h[1])]
          for (p, x), h in zip(flat, hashes)}


def _fingerprint_mismatches(saved: dict[str, list], restored: dict[str, list]) -> list[str]:
  # Leaves restored into another dtype (orbax casts) cannot be compared bit for bit.
  return [k for k, v in saved.items()
          if k in restored and restored[k][0] == v[0] and restored[k] != v]


# OS errors that say the machine or the storage failed, not the checkpoint's bytes.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENOMEM,
                                 errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ETIMEDOUT,
                                 errno.EROFS, errno.EDQUOT})
# TensorStore (orbax's array store) raises ValueErrors that start with an absl status.
_ENVIRONMENT_STATUSES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                         "DEADLINE_EXCEEDED", "UNAUTHENTICATED")


def is_environment_error(err: BaseException) -> bool:
  """Whether `err` (or an error it was raised from) is a failure of the machine or the
  storage, which retrying may fix, rather than damage to the checkpoint's contents."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, (MemoryError, PermissionError, TimeoutError, ConnectionError)):
      return True
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
      return True
    if str(err).lstrip().startswith(_ENVIRONMENT_STATUSES):
      return True
    err = err.__cause__ or err.__context__
  return False


def check_complete(path: str) -> None:
  """Raises CorruptCheckpointError if the step folder `path` lacks a commit marker."""
  for sub in ("", *ITEMS):
    if not os.path.isfile(os.path.join(path, sub, COMMIT_MARKER)):
      raise CorruptCheckpointError(
          path, f"{os.path.join(sub, COMMIT_MARKER) if sub else COMMIT_MARKER} is missing "
          "(the save never committed)")


def verify_fingerprint(path: str, integrity: dict[str, Any] | None, tree: Any) -> None:
  """Raises CorruptCheckpointError if the restored `tree` (all of the saved state or a
  subtree with the same leaf paths) differs from the save-time fingerprint."""
  if integrity is None:
    return
  saved = integrity["fingerprint"]
  restored = fingerprint(tree)
  unknown = sorted(set(restored) - set(saved))
  if unknown:
    raise CorruptCheckpointError(path, f"no save-time fingerprint for {unknown[:3]}")
  bad = _fingerprint_mismatches(saved, restored)
  if bad:
    raise CorruptCheckpointError(
        path, f"restored values differ from their save-time fingerprint in "
        f"{len(bad)} array(s), e.g. {', '.join(bad[:3])}")


def step_folders(directory: str) -> list[int]:
  """The numbered step folders under `directory`, ascending, committed or not
  (read-only: orbax's temporary folders are neither listed nor touched)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def read_extra(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(extra, integrity) of the step folder `path`: its JSON item, read-only."""
  file = os.path.join(path, "extra", "metadata")
  try:
    with open(file) as f:
      extra = json.load(f)
  except (OSError, ValueError) as err:
    if is_environment_error(err):
      raise
    raise CorruptCheckpointError(path, f"extra/metadata is unreadable ({err})") from err
  if not isinstance(extra, dict):
    raise CorruptCheckpointError(path, "extra/metadata does not hold a JSON object")
  return extra, extra.pop(_INTEGRITY_KEY, None)


@contextlib.contextmanager
def _quiet_absl():
  """Hides orbax's warnings while a step folder is opened directly: it warns that the
  manager's _CHECKPOINT_METADATA is absent (no fault) and for metadata it cannot read,
  which `read_params` reports itself."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


def _stored_tree(ckptr, path: str) -> Any:
  """The tree metadata of the step folder's state item (shapes and dtypes per leaf)."""
  try:
    # orbax answers None (and logs a warning) for metadata it cannot read.
    stored = getattr(ckptr.metadata(os.path.join(path, "state")).item_metadata, "tree", None)
  except Exception as err:  # noqa: BLE001 - classified just below
    if is_environment_error(err):
      raise
    stored, cause = None, err
  else:
    cause = None
  if stored is None:
    raise CorruptCheckpointError(path, "the tree metadata of its state item is unreadable"
                                 ) from cause
  return stored


def _first_difference(stored: Any, target: Any) -> str | None:
  """'leaf <path>: stored <shape>, expected <shape>' for the first differing leaf."""
  have = {_path_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  want = {_path_key(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(target)[0]}
  for key in sorted(set(have) | set(want)):
    if have.get(key) != want.get(key):
      return f"leaf {key}: stored {have.get(key, 'absent')}, expected {want.get(key, 'absent')}"
  return None


def _restore_read_only(ckptr, path: str, target: Any, *, partial: bool) -> Any:
  """Restores `target` (ShapeDtypeStructs with shardings) from the state item; a failure
  that is not the environment's is a CorruptCheckpointError naming `path`."""
  try:
    return ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial))
  except Exception as err:  # noqa: BLE001 - classified just below
    if is_environment_error(err):
      raise
    first_line = (str(err).splitlines() or [""])[0][:300]   # TensorStore dumps its spec
    raise CorruptCheckpointError(path, f"{type(err).__name__}: {first_line}") from err


def on_first_device(abstract: Any) -> Any:
  """`abstract`'s ShapeDtypeStructs placed on this process's first device: a read-only
  reader's target, whatever mesh and process count wrote the checkpoint."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                      abstract)


def read_params(path: str, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
  """Restores only the params of the step folder `path`, read-only; returns (params, extra).

  `abstract_params`: ShapeDtypeStructs with shardings (the current mesh, or one device);
  the params come back in the dtype they were saved in. They are found at
  `train.params` (the trainer's layout) or `params`. Raises CorruptCheckpointError
  (incomplete, unreadable or garbled: commit markers, then the save-time fingerprint of
  every restored array) and CheckpointMismatchError (a sound step whose params have
  other shapes); nothing on disk is changed either way.
  """
  check_complete(path)
  extra, integrity = read_extra(path)
  with ocp.PyTreeCheckpointer() as ckptr, _quiet_absl():
    stored = _stored_tree(ckptr, path)
    top = stored if isinstance(stored, dict) else {}
    trainer_layout = "train" in top
    stored_params = (top["train"] if trainer_layout else top).get("params")
    if not isinstance(stored_params, dict):
      raise CheckpointMismatchError(f"checkpoint {path} holds no 'params' tree (its top "
                                    f"keys: {sorted(top)})")
    diff = _first_difference(stored_params, abstract_params)
    if diff:
      raise CheckpointMismatchError(
          f"checkpoint {path}: cannot restore a 'params' tree matching the model config "
          f"({diff}); check the model config")
    # In the stored (trained) dtype, so that every array is checked bit for bit.
    target = {"params": jax.tree.map(
        lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=a.sharding),
        abstract_params, stored_params)}
    target = {"train": target} if trainer_layout else target
    out = _restore_read_only(ckptr, path, target, partial=True)
  verify_fingerprint(path, integrity, out)
  return (out["train"] if trainer_layout else out)["params"], extra


def read_state(path: str, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores the whole saved state of the step folder `path` (train state, rng, ...)
  onto `abstract_state`'s structure, dtypes and shardings, read-only; (state, extra).

  The same checks as `read_params` (commit markers, fingerprint of every array), and a
  CheckpointMismatchError naming the first differing leaf when the stored tree is
  another one; nothing on disk is changed.
  """
  check_complete(path)
  extra, integrity = read_extra(path)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  with ocp.PyTreeCheckpointer() as ckptr, _quiet_absl():
    try:
      out = _restore_read_only(ckptr, path, target, partial=False)
    except CorruptCheckpointError:
      diff = _first_difference(_stored_tree(ckptr, path), target)
      if diff:
        raise CheckpointMismatchError(   # pylint: disable=raise-missing-from
            f"checkpoint {path} holds another state tree than the one asked for ({diff}); "
            "read it with the config that wrote it")
      raise
  verify_fingerprint(path, integrity, out)
  return out, extra


def read_step(directory: str, step: int | None, read: Callable[[str], Any]
              ) -> tuple[int, Any]:
  """(step, read(<directory>/<step>)): the newest step folder, or `step`, read-only.

  The one way a tool picks a step: a missing step is a FileNotFoundError listing those
  found, a damaged one a CorruptCheckpointError naming the other steps (never a silent
  fallback to an older one).
  """
  steps = step_folders(directory)
  if not steps:
    raise FileNotFoundError(f"{directory} holds no checkpoint step folder")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise FileNotFoundError(f"--step={step}: no such checkpoint under {directory}; "
                            f"found steps {steps}")
  try:
    return chosen, read(os.path.join(directory, str(chosen)))
  except CorruptCheckpointError as err:
    others = [s for s in steps if s != chosen]
    raise CorruptCheckpointError(
        err.path, f"{err.reason}. Nothing was changed; "
        + (f"pass --step with one of {others} to read another checkpoint" if others
           else "no other checkpoint to read")) from err


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with a fixed (state, extra) layout."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._closed = False
    self.quarantine_directory = self.directory + ".quarantine"
    # The newest `max_to_keep` steps, and always step 0 (the model before RL), which the
    # evaluation of "before vs after RL" needs.
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(max_to_keep),
        ocp.checkpoint_managers.CustomSteps([0])])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=policy)
    # Explicit handlers let `item_metadata` read a step's tree before restoring it.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "extra": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (a pytree of arrays) and `extra` (JSON)."""
    if _INTEGRITY_KEY in extra:
      raise ValueError(f"extra[{_INTEGRITY_KEY!r}] is reserved for the checkpoint's "
                       "fingerprint; rename that key")
    # Taken before the save returns: the caller may donate `state` right afterwards.
    extra = {**extra, _INTEGRITY_KEY: {"fingerprint": fingerprint(state)}}
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      extra=ocp.args.JsonSave(extra)), force=force)
    fault_injection.during_save(step)
    return saved

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def check_complete(self, step: int) -> None:
    """Raises CorruptCheckpointError if `step` lacks a commit marker."""
    check_complete(self.step_path(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` onto the structure, dtypes and shardings of `abstract_state`.

    Raises:
      CorruptCheckpointError: the checkpoint is incomplete, unreadable or garbled.
      CheckpointMismatchError: it is sound but holds another tree than `abstract_state`.
    """
    path = self.step_path(step)
    self.check_complete(step)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        extra=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001 - classified just below
      if is_environment_error(err):
        raise
      mismatch = self._tree_mismatch(step, target)
      if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds another state tree than this job restores "
            f"({mismatch}); resume with the config and code that wrote it, or use a new "
            "workdir") from err
      first_line = (str(err).splitlines() or [""])[0][:300]   # TensorStore dumps its spec
      raise CorruptCheckpointError(path, f"{type(err).__name__}: {first_line}") from err
    state, extra = out["state"], dict(out["extra"])
    verify_fingerprint(path, extra.pop(_INTEGRITY_KEY, None), state)
    return state, extra

  def _tree_mismatch(self, step: int, target: Any) -> str | None:
    """The first difference between the stored tree and `target`, if both are readable."""
    try:
      stored = self._manager.item_metadata(step)["state"].tree
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
      return None
    return _first_difference(stored, target)

  def quarantine(self, step: int) -> str | None:
    """Moves `step` out of the managed folder; returns its new path (process 0 moves)."""
    src = self.step_path(step)
    dst = None
    if jax.process_count() > 1:   # every process has finished reading it
      ocp.multihost.sync_global_processes(f"egpo_quarantine_{step}_start")
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(self.quarantine_directory, exist_ok=True)
      dst = os.path.join(self.quarantine_directory,
                         f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
      suffix = 0
      while os.path.exists(dst + (f".{suffix}" if suffix else "")):
        suffix += 1
      dst += f".{suffix}" if suffix else ""
      shutil.move(src, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"egpo_quarantine_{step}_done")
    self._manager.reload()
    return dst

  def restore_latest(self, abstract_state: Any, *, quarantine: bool = True
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores cleanly, or None when there is none.

    Incomplete or corrupt steps on the way are skipped with a warning naming their path
    and, with `quarantine`, moved aside (see the module docstring).
    """
    for step in reversed(self.all_steps()):
      try:
        state, extra = self.restore(step, abstract_state)
      except CorruptCheckpointError as err:
        moved = self.quarantine(step) if quarantine else None
        log.warning("%s; %sfalling back to the previous checkpoint", err,
                    f"moved it to {moved}; " if moved else "")
        continue
      return step, state, extra
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and closes; closing again does nothing."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()

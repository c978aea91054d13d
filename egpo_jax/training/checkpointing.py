"""Orbax checkpoints of the train state plus JSON metadata (config, data iterator, counters).

Layout of `<workdir>/checkpoints/<step>/`: item `state` (StandardSave of the TrainState
pytree, whose `params` field the HF exporter reads) and item `extra` (JsonSave: config,
data iterator state, host counters). Saves are asynchronous; `restore_latest` walks back
from the newest step and skips checkpoints that fail to restore (killed mid-save,
truncated files), warning with the bad step's path, so a run resumes from the last good one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with a fixed (state, extra) layout."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # The newest `max_to_keep` steps, and always step 0 (the model before RL), which the
    # evaluation of "before vs after RL" needs.
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(max_to_keep),
        ocp.checkpoint_managers.CustomSteps([0])])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=policy)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      extra=ocp.args.JsonSave(extra)), force=force)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` onto the structure, dtypes and shardings of `abstract_state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      extra=ocp.args.JsonRestore()))
    return out["state"], out["extra"]

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores cleanly, or None when there is none."""
    for step in reversed(self.all_steps()):
      try:
        state, extra = self.restore(step, abstract_state)
      except Exception as err:  # noqa: BLE001 - any failure means this checkpoint is unusable
        log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                    self.directory, step, type(err).__name__, err)
        continue
      return step, state, extra
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

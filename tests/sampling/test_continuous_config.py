"""rollout.decode_attention, rollout.read_block and rollout.table_entries: from the config
to host mode's `HostRollout` (`train.host_rollout`), and one host iteration on them."""

import types

import jax
import numpy as np
import pytest

from egpo_jax.models import sharding
from egpo_jax.sampling import continuous
from egpo_jax.training import config as config_lib
from egpo_jax.training import dry_run, host_loop, iteration, train
from experiments.configs import default
from tests.sampling.test_continuous_host import CFG, OPT, _sample, _settings, state


def _job(overrides):
  c = config_lib.with_overrides(default.get_config(), overrides)
  exp = types.SimpleNamespace(settings=_settings(), model_config=CFG)
  return types.SimpleNamespace(c=c, exp=exp, mesh=sharding.make_mesh(sharding.MeshConfig(),
                                                                      jax.devices()[:1]))


def test_host_rollout_takes_the_config_fields():
  spec = train.host_rollout(_job({"rollout.slots": 8})).spec
  assert (spec.slots, spec.decode_attention, spec.table_entries) == (8, "bounded", 0)
  spec = train.host_rollout(_job({"rollout.slots": 8, "rollout.decode_attention": "full",
                                  "rollout.table_entries": 3})).spec
  assert (spec.decode_attention, spec.table_entries) == ("full", 3)
  spec = train.host_rollout(_job({"rollout.slots": 8, "rollout.decode_attention": "pallas",
                                  "rollout.read_block": 128})).spec
  assert (spec.decode_attention, spec.attention_block) == ("pallas", 128)


def test_dry_run_compiles_the_spec_host_mode_runs():
  """One builder (`experiment.continuous_spec`): the dry run's spec is host mode's."""
  overrides = {"rollout.slots": 8, "rollout.decode_attention": "full",
               "rollout.table_entries": 3, "task.name": "jsonl"}
  job = _job(overrides)
  ran = train.host_rollout(job).spec
  compiled = dry_run.spec_from_config(job.c).continuous
  assert (compiled.slots, compiled.decode_attention, compiled.table_entries) == (
      ran.slots, ran.decode_attention, ran.table_entries) == (8, "full", 3)
  assert dry_run.spec_from_config(_job({"rollout.slots": 0}).c).continuous is None


@pytest.mark.parametrize("field, value", [("rollout.decode_attention", "paged"),
                                          ("rollout.table_entries", -1),
                                          ("rollout.read_block", 0)])
def test_config_refuses_bad_values(field, value):
  c = config_lib.with_overrides(default.get_config(), {field: value})
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.validate(c, inputs_exist=False)


def test_host_iteration_on_bounded_attention_and_three_entries(state):
  """8 prompts through a 3-entry table, T = 256 (4 attention blocks), streamed."""
  settings = _settings()
  spec = continuous.ContinuousSpec(settings.sampling, slots=8, decode_attention="bounded",
                                   table_entries=3)
  rollout = continuous.HostRollout(CFG, spec, chunk_steps=64)
  _, m = host_loop.host_iteration(
      state, jax.random.PRNGKey(4), iteration.AlgoArrays.create("egpo"),
      task=host_loop.HostTask(_sample, lambda i, m, a: np.asarray([x[0] for x in i]) % 2 == 0),
      model_config=CFG, optimizer=OPT, settings=settings, rollout=rollout)
  assert np.isfinite(m["loss"]) and 0 < m["slot_utilisation"] <= 1

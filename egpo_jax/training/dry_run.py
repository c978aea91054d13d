"""Will this config fit, and what will it move? A compile-only dry run of one RL iteration.

The trainer's own functions are compiled from abstract shapes (`jax.ShapeDtypeStruct`
with the trainer's shardings) on the configured mesh, never run, so the paper's 7B setup
can be checked on a laptop with fake CPU devices:

    python -m experiments.main --config=experiments/configs/paper.py:egpo,qwen2.5-math-7b \
        --dry_run --dry_run_devices=8 [--dry_run_json=out.json] [--device_memory_gb=80]

or for a real TPU slice, compiled by libtpu on this machine without a TPU (deviceless
ahead-of-time compilation; `pip install -e ".[tpu-aot]"`):

    python -m experiments.main --config=... --dry_run --dry_run_topology=v5e:4x4

Phases, each one compilation of what the host loop runs (`host_loop.host_iteration`):

  reshard     with rollout.tensor (a rollout mesh other than the training mesh):
              `distributed.rollout_params`, the params cast to the compute dtype and
              moved onto the rollout mesh, once per iteration.
  rollout     rollout.slots = 0: `host_loop._rollout` (prefill + the decode `while_loop`s
              of `engine.rollout` over all B x G rows). rollout.slots > 0 (host mode's
              continuous batching): `continuous._run_jit`, the slot decode loop, one
              call per chunk of rollout.chunk_steps steps, after
  rollout_prefill  `continuous._start_jit`: the prompt table's prefill and the slots.
  old_logps   `iteration.prepare_batch` without the KL pass: the trainer's old log-probs
              (loss.old_logps="recompute" or TIS), entropy proxy, advantages.
  ref_logps   `iteration.prepare_batch` with only the reference pass (loss.kl_coef > 0).
  update      `update.update`: PPO epochs x minibatches x micro-batches, state donated.

Host mode runs old_logps, ref_logps and update as one program (`_prepare_and_update`),
whose buffers are freed between its parts; they are compiled apart here so that each
pass gets its own peak. The jitted (synthetic-task) loop runs the same pure functions
inside one scan.

Per phase: XLA's per-device buffer assignment (`compiled.memory_analysis()`: arguments,
temporaries, outputs, minus outputs aliased to donated inputs = the peak), the largest
buffers of the compiled program, and its collectives read from the partitioned HLO
(`parse_collectives`): the result of an all-gather, the operand of a reduce-scatter or
all-reduce, the result of an all-to-all or collective-permute, each times the trip counts
of the loops around it. Next to them, the FSDP floor (`fsdp_floor_bytes`).

On fake CPU devices the figures are CPU-compiled estimates: the CPU backend keeps some
bf16 tensors with an extra f32 copy (`f32_weight_copy_bytes`: its per-layer f32 copies of
the decode weights) and has no TPU tile padding, so treat them as +-30%. XLA:CPU also runs
bf16 collectives in f32 (rounded to bf16, widened around the collective); those count as
the bf16 a GPU or TPU moves. With a TPU topology (`tpu_devices`) the meshes are built from
the topology's compile-only devices and libtpu compiles every phase for that chip: the
figures are XLA's TPU buffer assignment (tile padding included), nothing allocated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from egpo_jax.models import sharding
from egpo_jax.models.config import ModelConfig
from egpo_jax.types import TrainState

GB = 1e9
CAVEAT = ("CPU-compiled estimates (XLA's CPU buffer assignment, +-30% of what a GPU or TPU "
          "allocates); nothing was allocated")
TPU_AOT_INSTALL = 'pip install -e ".[tpu-aot]"'
# HBM per chip (GiB) by the compile-only device's `device_kind` (Google's published specs);
# the default --device_memory_gb of a topology of that chip.
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")

# ---------------------------------------------------------------------------------------
# The partitioned HLO: collectives, loops and buffers.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "s4": 1, "u4": 1, "s2": 1, "u2": 1, "token": 0,
                **{f"f8{k}": 1 for k in ("e4m3", "e4m3fn", "e4m3fnuz", "e4m3b11fnuz", "e5m2",
                                         "e5m2fnuz", "e3m4", "e8m0fnu")}}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# An array shape with its layout; XLA:TPU's layouts name a memory space other than HBM
# (`S(1)`: on-chip VMEM, ...) after the tiles, e.g. `bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`.
_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_CONSTANT = re.compile(r"^constant\((-?\d+)\)")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEES = re.compile(r"\b(body|condition|calls|true_computation|false_computation)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that name or forward existing buffers rather than writing a new one.
_NO_BUFFER = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
              "after-all", "partition-id", "replica-id", "while", "conditional", "call"}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: an array `bf16[16,4096,1536]{2,1,0}` or a tuple."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"HLO shape {shape!r}: unknown element type {dtype!r}")
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def device_memory_bytes(shape: str) -> int:
  """`shape_bytes` of the arrays in device memory (HBM): arrays whose layout puts them in
  another memory space (XLA:TPU's `S(1)`, on-chip) are left out."""
  total = 0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
    space = _MEMORY_SPACE.search(layout or "")
    if not space or space.group(1) == "0":
      total += shape_bytes(f"{dtype}[{dims}]")
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) all-reduce(...)' -> ('(f32[2], s32[])', 'all-reduce(...)')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].strip()
  shape, _, tail = rest.partition(" ")
  return shape, tail.strip()


def _tuple_elements(shape: str) -> list[str]:
  """Top-level elements of a tuple shape (an array shape is its own single element)."""
  if not shape.startswith("("):
    return [shape]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if (ch == "," and depth == 1) or i == len(shape) - 1:
      out.append(shape[start:i].strip())
      start = i + 1
  return [s for s in out if s]


def replica_group_size(attrs: str, num_partitions: int) -> int:
  """Devices per replica group of a collective, from any of XLA's three spellings:
  `{{0,1},{2,3}}`, iota `[2,4]<=[8]`, or `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`
  (possibly with `, device_ids=([4,2]T(1,0))` before the axes)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*?\{([^}]*)\}", attrs)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in
                 (item.split("=") for item in m.group(1).split(",") if item))
    return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  return num_partitions   # `replica_groups={}`: one group of every device


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program, per device.

  bytes: the counted buffer of one execution (see `parse_collectives`).
  executions: how often it runs per call of the program (product of enclosing loops'
    trip counts).
  group_size: devices in each of its replica groups.
  """
  kind: str
  bytes: int
  executions: int
  group_size: int
  replica_groups: str
  op_name: str

  @property
  def total_bytes(self) -> int:
    return self.bytes * self.executions


@dataclasses.dataclass(frozen=True)
class HloSummary:
  """What `parse_hlo` reads from a partitioned module.

  unknown_loops: per-trip collective bytes of each `while` loop whose trip count XLA
    could not prove, in program order (the rollout's decode loops); their collectives
    count with the trip counts the caller gave.
  """
  collectives: tuple[Collective, ...]
  largest_buffers: tuple[dict[str, Any], ...]
  unknown_loops: tuple[int, ...]


def _parse_module(hlo: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str, int]:
  """computation name -> [(name, shape, opcode, rest)], the entry's name, partitions."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  entry, current = "", None
  m = re.search(r"num_partitions=(\d+)", hlo)
  partitions = int(m.group(1)) if m else 1
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.lstrip().startswith(("ROOT", "%" + head.group(2) + " =")):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    inst = _INSTRUCTION.match(line) if current else None
    if inst:
      shape, tail = _split_shape(inst.group(2))
      opcode = tail.split("(", 1)[0].strip()
      comps[current].append((inst.group(1), shape, opcode, tail))
  if not entry:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry, partitions


def _operands(rest: str) -> list[str]:
  """Names of an instruction's operands ('add(%a, %b), ...' -> ['a', 'b'])."""
  return re.findall(r"%([^\s,()]+)", rest.split(")", 1)[0])


def _source(defs: dict[str, tuple[str, str]], name: str) -> tuple[str, str, str]:
  """(name, opcode, rest) of what `name` copies, bitcasts or converts (itself if none)."""
  for _ in range(8):
    opcode, rest = defs.get(name, ("", ""))
    if opcode not in ("copy", "bitcast", "convert") or not _operands(rest):
      break
    name = _operands(rest)[0]
  return name, *defs.get(name, ("", ""))


def _constant_value(defs: dict[str, tuple[str, str]], name: str) -> int | None:
  """The integer a scalar names, through copies and bitcasts; None if not a constant."""
  _, opcode, rest = _source(defs, name)
  m = _CONSTANT.match(rest) if opcode == "constant" else None
  return int(m.group(1)) if m else None


def _tuple_index(defs: dict[str, tuple[str, str]], name: str) -> int | None:
  """k if `name` is (a copy of) get-tuple-element index=k, else None."""
  _, opcode, rest = _source(defs, name)
  m = re.search(r"index=(\d+)", rest) if opcode == "get-tuple-element" else None
  return int(m.group(1)) if m else None


def static_trip_count(comps, caller_defs: dict[str, tuple[str, str]], rest: str
                      ) -> int | None:
  """Trip count of a `while` whose condition is `counter < constant`, whose counter
  starts at a constant and whose body adds a constant step to it (a scan, a fori_loop,
  XLA:TPU's windowed einsum unrolled by 2), for modules without XLA's `known_trip_count`
  (XLA:TPU does not annotate them); None otherwise (a decode loop's data-dependent
  condition)."""
  callees = dict(_CALLEES.findall(rest))
  cond = comps.get(callees.get("condition", ""), [])
  body = comps.get(callees.get("body", ""), [])
  # A computation's root is the last instruction of its text.
  if not cond or not body or cond[-1][2] != "compare" or "direction=LT" not in cond[-1][3]:
    return None
  defs = {name: (opcode, tail) for name, _, opcode, tail in cond}
  counter, bound = (_operands(cond[-1][3]) + ["", ""])[:2]
  limit, index = _constant_value(defs, bound), _tuple_index(defs, counter)
  init = _operands(rest)
  _, opcode, tail = _source(caller_defs, init[0] if init else "")
  elements = _operands(tail) if opcode == "tuple" else []
  body_defs = {name: (opcode, tail) for name, _, opcode, tail in body}
  updated = _operands(body[-1][3]) if body[-1][2] == "tuple" else []
  if limit is None or index is None or index >= min(len(elements), len(updated)):
    return None
  start = _constant_value(caller_defs, elements[index])
  _, opcode, tail = _source(body_defs, updated[index])
  terms = _operands(tail) if opcode == "add" else []
  steps = [_constant_value(body_defs, b) for a, b in ((terms, terms[::-1])
                                                       if len(terms) == 2 else ())
           if _tuple_index(body_defs, a) == index]
  step = next((x for x in steps if x), None)
  if start is None or step is None or step < 1:
    return None
  return max(-(-(limit - start) // step), 0)


def _widened_bf16(comps, defs: dict[str, tuple[str, str]], operand: str) -> bool:
  """Whether `operand` is bf16 values carried in f32: a fusion that rounds to bf16 and
  converts back. XLA:CPU runs bf16 collectives that way (its float normalisation), where a
  GPU or TPU moves the bf16 values themselves."""
  opcode, rest = defs.get(operand, ("", ""))
  called = _CALLEES.findall(rest)
  if opcode != "fusion" or not called:
    return False
  body = comps.get(called[0][1], [])
  rounded = {name for name, shape, op, _ in body if op == "convert" and shape.startswith("bf16")}
  return any(op == "convert" and shape.startswith("f32")
             and any(f"%{r})" in tail or f"%{r}," in tail for r in rounded)
             for _, shape, op, tail in body)


def _counted_bytes(kind: str, opcode: str, shape: str, group: int,
                   widened: Sequence[bool] = ()) -> int:
  """Result of an all-gather, operand of a reduce-scatter / all-reduce, result otherwise;
  an f32 part that carries bf16 values (`widened`, per operand) counts 2 bytes a value."""
  parts = _tuple_elements(shape)
  if opcode.endswith("-start"):
    if kind == "all-gather":   # (operands..., results...)
      parts = parts[len(parts) // 2:]
    elif kind == "collective-permute":   # (operand, result, contexts...)
      parts = parts[1:2]
  nbytes = sum(shape_bytes(p) // (2 if i < len(widened) and widened[i] and
                                  p.startswith("f32") else 1)
               for i, p in enumerate(parts))
  return nbytes * group if kind == "reduce-scatter" else nbytes


def parse_hlo(hlo: str, unknown_trip_counts: Sequence[int] = (), top_buffers: int = 8
              ) -> HloSummary:
  """Collectives (times their loops' trip counts) and largest buffers of a compiled,
  partitioned HLO module (`compiled.as_text()`); shapes there are per device.

  A `while` loop's trip count is XLA's `known_trip_count`, else its condition's constant
  bound (`static_trip_count`: XLA:TPU annotates none); the i-th loop with neither (in
  program order) runs `unknown_trip_counts[i]` times (1 when the list is shorter).
  Largest buffers: device memory only (`device_memory_bytes`: not XLA:TPU's on-chip
  memory spaces), an async copy's destination alone.
  Collectives inside fusions or async wrappers count where their caller runs, each
  channel once (XLA:TPU clones an async collective into its start, the fusion it
  overlaps with and its done, all with the start's channel_id). bf16 values
  that XLA:CPU widens to f32 around a collective count as bf16 (`_widened_bf16`).
  """
  comps, entry, partitions = _parse_module(hlo)
  defs = {comp: {name: (opcode, rest) for name, _, opcode, rest in insts}
          for comp, insts in comps.items()}
  collectives: list[Collective] = []
  buffers: dict[tuple[str, str], dict[str, Any]] = {}
  unknown: list[int] = []
  channels: set[str] = set()

  def visit(comp: str, executions: int, fused: bool) -> int:
    """Walks `comp`; returns the collective bytes of one execution of it."""
    own = 0
    for name, shape, opcode, rest in comps.get(comp, []):
      kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      channel = _CHANNEL.search(rest) if kind in COLLECTIVE_KINDS else None
      if channel and channel.group(1) in channels:
        continue   # XLA:TPU's clone of an async collective counted at its start
      if kind in COLLECTIVE_KINDS:
        if channel:
          channels.add(channel.group(1))
        group = replica_group_size(rest, partitions)
        operands = _operands(rest)
        widened = [not opcode.endswith("-start") and _widened_bf16(comps, defs[comp], o)
                   for o in operands]
        nbytes = _counted_bytes(kind, opcode, shape, group, widened)
        op = _OP_NAME.search(rest)
        groups = re.search(r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\}|\S+?)(,\s|$)", rest)
        collectives.append(Collective(kind, nbytes, executions, group,
                                      groups.group(1) if groups else "",
                                      op.group(1) if op else name))
        own += nbytes
      elif not fused and opcode not in _NO_BUFFER and not opcode.endswith("-done"):
        # copy-start: (destination, source, context); only the destination is new.
        nbytes = device_memory_bytes(_tuple_elements(shape)[0] if opcode == "copy-start"
                                     else shape)
        op = _OP_NAME.search(rest)
        parts = _tuple_elements(shape)[:1 if opcode == "copy-start" else None]
        shown = parts[0].split("{")[0] + (f" +{len(parts) - 1} more" if len(parts) > 1 else "")
        key = (shown, op.group(1) if op else opcode)
        if nbytes and nbytes > buffers.get(key, {}).get("bytes", 0):
          buffers[key] = {"bytes": nbytes, "shape": key[0], "opcode": opcode,
                          "op_name": key[1][-120:], "executions": executions}
      callees = dict(_CALLEES.findall(rest))
      if opcode == "while":
        trip = _TRIP.search(rest)
        n = int(trip.group(1)) if trip else static_trip_count(comps, defs[comp], rest)
        index = None
        if n is None:
          index = len(unknown)
          unknown.append(0)
          n = unknown_trip_counts[index] if index < len(unknown_trip_counts) else 1
        per_trip = visit(callees["body"], executions * n, fused)
        if index is not None:
          unknown[index] = per_trip
        own += per_trip * n
        continue
      targets = [callees[k] for k in ("calls", "true_computation", "false_computation")
                 if k in callees]
      branches = _BRANCHES.search(rest)
      if branches:
        targets += [b.strip().lstrip("%") for b in branches.group(1).split(",") if b.strip()]
      for target in targets:
        own += visit(target, executions, fused or opcode == "fusion")
    return own

  visit(entry, 1, False)
  largest = sorted(buffers.values(), key=lambda b: -b["bytes"])[:top_buffers]
  return HloSummary(tuple(collectives), tuple(largest), tuple(unknown))


def bytes_by_kind(collectives: Sequence[Collective]) -> dict[str, int]:
  """Total bytes per call of the program, per collective kind (kinds absent: 0)."""
  out = {k: 0 for k in COLLECTIVE_KINDS}
  for c in collectives:
    out[c.kind] += c.total_bytes
  return out


# ---------------------------------------------------------------------------------------
# The FSDP floor.

def fsdp_floor_bytes(params: Any, mesh: Mesh, compute_dtype: Any, *, gathers: int,
                     gradients: bool) -> int:
  """Per-device collective bytes that FSDP cannot avoid on one pass of one micro-batch.

  Every parameter sharded over `fsdp` is all-gathered `gathers` times (forward: 1,
  forward + backward: 2) in the compute dtype, counting the gathered result (its share of
  a `tensor` split stays local). With `gradients`, every gradient is reduced over the
  batch axes in float32, counting the operand of its reduce-scatter (all-reduce where it
  is not fsdp-sharded): the issue's 2 x P x bytes + P x 4 per micro-batch on a pure FSDP
  mesh. A mesh of one device moves nothing.
  """
  specs = sharding.param_partition_specs(params, mesh)
  itemsize = np.dtype(compute_dtype).itemsize
  batch_devices = math.prod(mesh.shape[a] for a in sharding.BATCH)
  total = 0
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    axes = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
    tensor = mesh.shape["tensor"] if "tensor" in axes else 1
    local = math.prod(leaf.shape) // tensor   # after the gather: the tensor shard
    if "fsdp" in axes and mesh.shape["fsdp"] > 1:
      total += gathers * local * itemsize
    if gradients and batch_devices > 1:
      total += local * 4
  return total


# ---------------------------------------------------------------------------------------
# Abstract inputs with the trainer's shardings.

def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a matching tree, or one sharding)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings),
                        tree)
  return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                      tree, shardings)


def batch_sharded(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of a batch-leading pytree, rows over (data, fsdp) where they divide."""
  from egpo_jax.training import distributed
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
      s.shape, s.dtype, sharding=distributed.batch_sharding(s.shape, mesh)), tree)


def abstract_state(model_config: ModelConfig, optimizer: Any, mesh: Mesh) -> TrainState:
  """The train state (params + optimizer state + counters) as sharded ShapeDtypeStructs."""
  from egpo_jax.training import distributed
  params = sharding.abstract_params(model_config)
  state = jax.eval_shape(lambda p: TrainState.create(p, optimizer.init(p)), params)
  return with_shardings(state, distributed.state_shardings(state, mesh))


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """XLA's per-device buffer assignment of one compiled program (bytes)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int

  @classmethod
  def of(cls, compiled) -> CompiledMemory:
    stats = compiled.memory_analysis()
    return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
               int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))

  @property
  def peak_bytes(self) -> int:
    """Arguments + temporaries + outputs not written in place of donated arguments."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


# ---------------------------------------------------------------------------------------
# The phases.

@dataclasses.dataclass(frozen=True)
class PhaseReport:
  """One compiled phase: per-device memory, collectives per iteration, floor."""
  name: str
  function: str
  memory: CompiledMemory
  hlo: HloSummary
  floor_bytes: int
  compile_seconds: float
  decode_steps: int = 0
  calls: int = 1              # runs per iteration (the continuous rollout's chunks)
  resident_bytes: int = 0     # live on the device alongside, outside the program
  f32_weight_copy_bytes: int = 0
  refused: str = ""           # XLA:TPU's error when the program exceeds the chip's HBM

  @property
  def collective_bytes(self) -> int:
    return self.calls * sum(c.total_bytes for c in self.hlo.collectives)

  def to_json(self) -> dict[str, Any]:
    m = self.memory
    out = {"function": self.function, "peak_bytes_per_device": m.peak_bytes,
           "resident_bytes": self.resident_bytes,
           "peak_with_resident_bytes": m.peak_bytes + self.resident_bytes,
           "f32_weight_copy_bytes": self.f32_weight_copy_bytes,
           "calls_per_iteration": self.calls,
           "argument_bytes": m.argument_bytes, "temp_bytes": m.temp_bytes,
           "output_bytes": m.output_bytes, "alias_bytes": m.alias_bytes,
           "collective_bytes_per_iteration": self.collective_bytes,
           "collective_bytes_by_kind": {k: v * self.calls for k, v in
                                        bytes_by_kind(self.hlo.collectives).items()},
           "floor_bytes_per_iteration": self.floor_bytes,
           "collectives": [dict(dataclasses.asdict(c), total_bytes=c.total_bytes)
                           for c in self.hlo.collectives],
           "largest_buffers": list(self.hlo.largest_buffers),
           "compile_seconds": round(self.compile_seconds, 2)}
    if self.refused:
      out["refused"] = self.refused
    if self.decode_steps:
      loops = self.hlo.unknown_loops
      out["decode_loops"] = len(loops)
      out["decode_bytes_per_step"] = int(sum(loops) / max(len(loops), 1))
    return out


@dataclasses.dataclass(frozen=True)
class DryRunSpec:
  """What one iteration processes, from the config (the edges build it)."""
  model_config: ModelConfig
  settings: Any            # iteration.IterationSettings
  optimizer: Any           # the RL optimizer (optax)
  algo: Any                # iteration.AlgoArrays
  prompt_len: int
  label: str = ""
  slots: int = 0           # rollout.slots: > 0 compiles the continuous engine
  chunk_steps: int = 32    # rollout.chunk_steps
  rollout_tensor: int = 0  # rollout.tensor: the rollout's own mesh (0 = the training mesh)
  continuous: Any = None   # with slots: `experiment.continuous_spec`, what host mode runs


def _decode_trips(prompt_len: int, settings) -> list[int]:
  """Steps of each decode loop of `engine.continue_rollout` when every row runs to the cap."""
  from egpo_jax.sampling import engine
  spec = settings.sampling
  plan = engine.cache_plan(prompt_len, spec.max_new_tokens, spec.cache_phases)
  return [b - a for a, b in zip((prompt_len,) + plan[:-1], plan)]


def _compile(name: str, function: str, jitted, args, *, floor: int, trips=(),
             decode_steps: int = 0, static: dict[str, Any] | None = None, calls: int = 1,
             resident: int = 0, weight_sizes: frozenset = frozenset(), width: int = 0,
             keep: list | None = None, nested: bool = False) -> PhaseReport:
  """nested: `trips` are the outer loops' alone (in program order); the loops inside them
  (the continuous engine's bounded attention and table loads, data-dependent) count once
  per outer trip and are left out of the per-step figures."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args, **(static or {})).compile()
  except jax.errors.JaxRuntimeError as err:
    temp = _hbm_refusal_temp_bytes(str(err))
    if temp is None:
      raise
    if keep is not None:   # the next phase compiles on this program's output shardings
      raise DryRunError(f"phase {name!r} is over the chip's HBM, so XLA:TPU compiles "
                        f"neither it nor what follows: {str(err).strip().splitlines()[0]}"
                        ) from None
    # XLA:TPU compiles nothing larger than the chip's HBM: the phase keeps the figure it
    # gives (its temporaries) with its arguments' bytes, a lower bound of its peak.
    memory = CompiledMemory(sharding.per_device_bytes(args), 0, 0, temp)
    return PhaseReport(name, function, memory, HloSummary((), (), ()), floor,
                       time.perf_counter() - start, decode_steps, calls, resident,
                       refused=str(err).strip().splitlines()[0])
  if keep is not None:
    keep.append(compiled)
  seconds = time.perf_counter() - start
  hlo = parse_hlo(compiled.as_text(), trips)
  if nested:
    hlo = dataclasses.replace(hlo, unknown_loops=hlo.unknown_loops[:len(trips)])
  elif trips and len(hlo.unknown_loops) != len(trips):
    # The engine's loops are not the plan's: spread the steps evenly over the loops found.
    k = max(len(hlo.unknown_loops), 1)
    hlo = parse_hlo(compiled.as_text(), [-(-sum(trips) // k)] * k)
  return PhaseReport(name, function, CompiledMemory.of(compiled), hlo, floor, seconds,
                     decode_steps, calls, resident,
                     f32_weight_copies(compiled.as_text(), weight_sizes, width))


_HBM_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                          r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def _hbm_refusal_temp_bytes(message: str) -> int | None:
  """The temporaries' bytes (its units are binary) of XLA:TPU's refusal to compile a
  program over the chip's HBM, or None for any other error."""
  m = _HBM_REFUSAL.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1))


def f32_weight_copies(hlo: str, weight_sizes: frozenset, width: int) -> int:
  """Bytes of the float32 arrays that the program's entry computes (outside its loops)
  with the element count of one of the decode weights' per-device shards
  (`weight_sizes`) and a dimension of the model width `width`: XLA:CPU slices the
  stacked bf16 weights into per-layer ones (`transformer.decode_params`) converted to
  float32 for its dots, once, before the token loop; a GPU or TPU keeps those slices in
  bf16 (half these bytes). With the stacked shards' sizes (`decode_weight_sizes(...,
  per_layer=False)`), the whole stacked weights a prefill's layer scan reads, converted
  the same way (a GPU reads them as they are). Fusion internals are not buffers; an
  estimate."""
  if not weight_sizes:
    return 0
  comps, entry, _ = _parse_module(hlo)
  total = 0
  for _, shape, opcode, _ in comps.get(entry, []):
    if opcode not in ("fusion", "convert", "copy") or not shape.startswith("f32["):
      continue
    dims = tuple(int(d) for d in _ARRAY.match(shape).group(2).split(",") if d)
    if math.prod(dims) in weight_sizes and width in dims:
      total += shape_bytes(shape)
  return total


def decode_weight_sizes(params: Any, mesh: Mesh, gathered: bool = False,
                        per_layer: bool = True) -> frozenset:
  """Per-device element counts of the params' matrices as `mesh` shards them (the
  decode weights' per-layer slices: the stacked shard over its layers; per_layer=False:
  the stacked shards, as a prefill's layer scan reads them); `gathered`: whole over the
  batch axes, as the static sampler gathers them."""
  out = set()
  specs = sharding.param_partition_specs(params, mesh)
  if gathered:
    specs = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*(
        "tensor" if e == "tensor" or (isinstance(e, tuple) and "tensor" in e) else None
        for e in s)), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    if leaf.ndim >= 2:
      shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)
      layers = leaf.shape[0] if leaf.ndim >= 3 and per_layer else 1
      out.add(math.prod(shard) // layers)
  return frozenset(out)


def run_phases(spec: DryRunSpec, mesh: Mesh, log=None) -> list[PhaseReport]:
  """Compiles each phase of one host-mode iteration on `mesh` (call under no mesh
  context; this sets it). Returns the phases in the order an iteration runs them.

  With rollout.tensor (`distributed.rollout_mesh`), a `reshard` phase moves the params
  onto the rollout's mesh (cast to the compute dtype first) and the rollout compiles
  there. With rollout.slots, the rollout is the continuous engine (`_rollout_phases`).
  `resident_bytes` of a phase: the train state's bytes that live on the device during
  it without being its arguments (the optimizer moments; the f32 master params too
  while the rollout decodes from resharded bf16 ones)."""
  from egpo_jax.training import distributed, host_loop, iteration
  from egpo_jax.training import update as update_lib
  log = log or (lambda _msg: None)
  settings, cfg = spec.settings, spec.model_config
  b, g = settings.prompts_per_batch, settings.group_size
  rep = distributed.replicated(mesh)
  state = abstract_state(cfg, spec.optimizer, mesh)
  params = state.params
  state_bytes = sharding.per_device_bytes(state)
  not_params = state_bytes - sharding.per_device_bytes(params)
  use_ref = bool(settings.update.kl_coef)
  ref_params = params if use_ref else None
  ids = batch_sharded(jax.ShapeDtypeStruct((b, spec.prompt_len), jnp.int32), mesh)
  mask = batch_sharded(jax.ShapeDtypeStruct((b, spec.prompt_len), jnp.bool_), mesh)
  rng = with_shardings(jax.eval_shape(lambda: jax.random.PRNGKey(0)), rep)
  algo = with_shardings(spec.algo, rep)
  compute = jnp.dtype(cfg.dtype)
  u = settings.update
  micro_per_iteration = u.ppo_epochs * u.minibatches * u.micro_batches
  floor = functools.partial(fsdp_floor_bytes, params, mesh, compute)
  phases = []
  rmesh = distributed.rollout_mesh(mesh, spec.rollout_tensor, num_heads=cfg.num_heads,
                                   num_kv_heads=cfg.num_kv_heads)
  rollout_params, rollout_resident = params, not_params
  # bf16 decode weights on XLA:CPU: its f32 copies are counted (a TPU makes none).
  narrow = compute.itemsize < 4 and platform(mesh) == "cpu"
  if rmesh is not mesh:
    reshard = jax.jit(functools.partial(distributed.rollout_params, model_config=cfg,
                                        train_mesh=mesh, mesh=rmesh))
    moved = jax.eval_shape(reshard, params)
    rollout_params = with_shardings(moved, sharding.param_shardings(moved, rmesh))
    log("compiling reshard")
    with jax.set_mesh(mesh):
      # Floor: each device receives at most its new shard.
      phases.append(_compile("reshard", "distributed.rollout_params (to the rollout mesh)",
                             reshard, (params,),
                             floor=sharding.per_device_bytes(rollout_params),
                             resident=not_params))
    rollout_resident = state_bytes
  with jax.set_mesh(rmesh):
    if spec.slots:
      phases += _rollout_phases(spec, rmesh, rollout_params, rollout_resident, log)
    else:
      trips = _decode_trips(spec.prompt_len, settings)
      log("compiling rollout")
      rids, rmask = (batch_sharded(jax.ShapeDtypeStruct(x.shape, x.dtype), rmesh)
                     for x in (ids, mask))
      # Prefill and each decode loop need the weights once (issue 25's target).
      phases.append(_compile(
          "rollout", "host_loop._rollout", host_loop._rollout,
          (rollout_params, rids, rmask, with_shardings(rng, distributed.replicated(rmesh))),
          static={"model_config": cfg, "settings": settings},
          floor=fsdp_floor_bytes(params, rmesh, compute, gathers=1 + len(trips),
                                 gradients=False), trips=trips, decode_steps=sum(trips),
          resident=rollout_resident,
          weight_sizes=frozenset() if not narrow else decode_weight_sizes(params, rmesh, gathered=True),
          width=cfg.hidden_size))
  with jax.set_mesh(mesh):
    gen = jax.eval_shape(functools.partial(host_loop._rollout, model_config=cfg,
                                           settings=settings), params, ids, mask, rng)
    correct = batch_sharded(jax.ShapeDtypeStruct((b * g,), jnp.bool_), mesh)
    groups = batch_sharded(jax.eval_shape(
        functools.partial(host_loop._group, settings=settings), ids, mask,
        batch_sharded(gen, mesh), correct, algo.overlong), mesh)

    def prepare(pass_settings):
      return jax.jit(functools.partial(iteration.prepare_batch, model_config=cfg,
                                       settings=pass_settings))

    # A forward pass gathers each micro-batch's weights once (`update.batch_logprobs` runs
    # minibatches x micro_batches of them, once per iteration whatever the PPO epochs).
    pass_floor = floor(gathers=1, gradients=False) * u.minibatches * u.micro_batches
    trainer_pass = settings.old_logps == "recompute" or settings.tis_cap > 0
    no_kl = dataclasses.replace(settings, update=dataclasses.replace(u, kl_coef=0.0))
    log("compiling old_logps")
    phases.append(_compile(
        "old_logps", "iteration.prepare_batch (no KL pass)", prepare(no_kl),
        (params, None, groups, algo),
        floor=pass_floor if trainer_pass else 0, resident=not_params))
    if use_ref:
      ref_only = dataclasses.replace(settings, old_logps="sampler", tis_cap=0.0)
      log("compiling ref_logps")
      phases.append(_compile(
          "ref_logps", "iteration.prepare_batch (reference pass only)", prepare(ref_only),
          (params, ref_params, groups, algo),
          floor=pass_floor, resident=not_params))
    batch = batch_sharded(jax.eval_shape(prepare(settings), params, ref_params, groups,
                                         algo)[0], mesh)
    update = jax.jit(functools.partial(
        update_lib.update, optimizer=spec.optimizer, model_config=cfg, settings=u,
        switches=spec.algo.loss_switches(), group_size=g),
        out_shardings=(distributed.state_shardings(state, mesh), rep), donate_argnums=(0,))
    log("compiling update")
    phases.append(_compile("update", "update.update (state donated)", update,
                           (state, batch, rng),
                           floor=floor(gathers=2, gradients=True) * micro_per_iteration))
  return phases


def continuous_steps(spec: DryRunSpec) -> int:
  """Decode steps of the continuous engine when every response runs to its cap: each
  slot serves ceil(N / S) responses one after another, T steps each."""
  s = spec.settings
  return -(-s.prompts_per_batch * s.group_size // spec.slots) * s.sampling.max_new_tokens


def _rollout_phases(spec: DryRunSpec, mesh: Mesh, params: Any, resident: int, log
                    ) -> list[PhaseReport]:
  """Host mode's continuous rollout (`continuous.HostRollout`) on `mesh` (set by the
  caller): `rollout_prefill` = `continuous._start_jit` (the prompt table's prefill and
  the empty slots), `rollout` = `continuous._run_jit` (the slot decode loop, one call per
  chunk of rollout.chunk_steps steps, the cache donated), compiled on the shardings the
  first program's outputs really have.

  The prompt table is an output of the first and an argument of the second, so each
  peak counts it. While a chunk decodes, the host still holds the previous chunk's
  outputs (not donated, read for the verifier): the decode phase's resident bytes add
  them. Collectives: the decode program runs ceil(steps / chunk_steps) times per
  iteration at the worst case (`continuous_steps`), each call gathering what it gathers
  before its loop again; the floor is the weights gathered once for the prefill and once
  for the decode."""
  from egpo_jax.sampling import continuous, engine
  from egpo_jax.training import distributed
  s, cfg = spec.settings, spec.model_config
  b, n = s.prompts_per_batch, s.prompts_per_batch * s.group_size
  cspec = spec.continuous
  if cspec is None or cspec.slots != spec.slots:
    raise DryRunError("DryRunSpec.continuous: build it with experiment.continuous_spec "
                      "(spec_from_config does)")
  bucket = engine.bucket_length(engine.bucket_length(spec.prompt_len))
  rep = distributed.replicated(mesh)
  # The host passes numpy (uncommitted): replicated inputs.
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)  # noqa: E731
  rng = with_shardings(jax.eval_shape(lambda: jax.random.PRNGKey(0)), rep)
  static = {"config": cfg, "spec": cspec, "cache_dtype": None}
  start_args = (params, i32(b, bucket), i32(b, bucket), rng, i32(b), i32(n), i32(n))
  params_f32 = sharding.abstract_params(cfg)
  compute = jnp.dtype(cfg.dtype)
  log("compiling rollout_prefill")
  kept = []
  narrow = compute.itemsize < 4 and platform(mesh) == "cpu"
  # The prefill's layer scan reads the stacked weights: XLA:CPU converts each whole to f32.
  prefill = _compile("rollout_prefill", "continuous._start_jit (prompt table + slots)",
                     continuous._start_jit, start_args, static=static,
                     floor=fsdp_floor_bytes(params_f32, mesh, compute, gathers=1,
                                            gradients=False),
                     resident=resident, keep=kept,
                     weight_sizes=(decode_weight_sizes(params, mesh, per_layer=False)
                                   if narrow else frozenset()), width=cfg.hidden_size)
  shapes = jax.eval_shape(functools.partial(continuous._start_jit, **static), *start_args)
  table, keys_n, state = with_shardings(shapes, kept[0].output_shardings)
  steps = continuous_steps(spec)
  chunk = spec.chunk_steps if spec.chunk_steps > 0 else steps
  calls = -(-steps // chunk)
  run_args = (params, state.replace(cache=None), state.cache, table, keys_n, i32(n), i32(n),
              jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  log("compiling rollout (slot decode loop)")
  run_static = {"config": cfg, "spec": cspec}
  entries = cspec.entries(b)
  if entries < b:   # the table is loaded inside the loop, from the bucketed prompts
    run_static["prompts"] = (i32(b, bucket), i32(b, bucket))
  decode = _compile("rollout", f"continuous._run_jit ({spec.slots} slots, {calls} chunk(s)"
                    f" of {chunk} steps, {cspec.decode_attention} attention, "
                    f"{entries}-entry table)", continuous._run_jit, run_args,
                    static=run_static, trips=[chunk], nested=True, calls=calls,
                    decode_steps=steps,
                    floor=fsdp_floor_bytes(params_f32, mesh, compute, gathers=1,
                                           gradients=False),
                    weight_sizes=(decode_weight_sizes(params, mesh)
                                  if narrow else frozenset()),
                    width=cfg.hidden_size, keep=kept)
  m = decode.memory
  held = (m.output_bytes - m.alias_bytes) if calls > 1 else 0
  return [prefill, dataclasses.replace(decode, resident_bytes=resident + held)]


# ---------------------------------------------------------------------------------------
# The report.

def platform(mesh: Mesh) -> str:
  """What the mesh's devices are ("cpu": fake CPU devices; "tpu": a topology's)."""
  return mesh.devices.flat[0].platform


def target_json(mesh: Mesh, topology: str = "") -> dict[str, Any]:
  """What the phases were compiled for: platform, device kind, and for a TPU topology
  its name, libtpu's version and the chip's HBM (`TPU_HBM_GIB`, 0 when unknown)."""
  device = mesh.devices.flat[0]
  out = {"platform": device.platform, "device_kind": device.device_kind,
         "topology": topology}
  if device.platform == "tpu":
    out["libtpu"] = importlib.metadata.version("libtpu")
    out["hbm_bytes_per_device"] = TPU_HBM_GIB.get(device.device_kind, 0) * 2**30
  return out


def caveat(target: dict[str, Any]) -> str:
  """How to read the figures: CPU estimates, or what libtpu compiled for which slice."""
  if target["platform"] != "tpu":
    return CAVEAT
  return (f"TPU-compiled by libtpu {target['libtpu']} for {target['topology']} "
          f"({target['device_kind']}; XLA's TPU buffer assignment, tile padding included); "
          "nothing was allocated")


def report_json(phases: Sequence[PhaseReport], spec: DryRunSpec, mesh: Mesh,
                state_bytes: int, rollout_mesh: Mesh | None = None,
                topology: str = "") -> dict[str, Any]:
  """The JSON `--dry_run_json` writes (keys documented in docs/LAUNCHING.md);
  `topology`: the TPU slice the mesh's devices are from (`tpu_devices`)."""
  s, cfg = spec.settings, spec.model_config
  target = target_json(mesh, topology)
  total = sum(p.collective_bytes for p in phases)
  floor = sum(p.floor_bytes for p in phases)
  kinds = collections.Counter()
  for p in phases:
    kinds.update(bytes_by_kind(p.hlo.collectives))
  return {
      "label": spec.label, "caveat": caveat(target), "target": target,
      "devices": mesh.size, "mesh": dict(mesh.shape),
      "model": {"params": cfg.num_params(), "dtype": cfg.dtype,
                "param_dtype": cfg.param_dtype, "remat": cfg.remat},
      "batch": {"prompts": s.prompts_per_batch, "group_size": s.group_size,
                "prompt_len": spec.prompt_len, "max_new_tokens": s.sampling.max_new_tokens,
                "micro_batches": s.update.micro_batches, "minibatches": s.update.minibatches,
                "ppo_epochs": s.update.ppo_epochs, "old_logps": s.old_logps},
      "state_bytes_per_device": state_bytes,
      "rollout": {"mesh": dict((rollout_mesh or mesh).shape), "slots": spec.slots,
                  "chunk_steps": spec.chunk_steps if spec.slots else 0,
                  "decode_steps": next((p.decode_steps for p in phases
                                        if p.name == "rollout"), 0)},
      "phases": {p.name: _phase_json(p, target) for p in phases},
      "collectives": {"bytes_per_iteration": total, "floor_bytes_per_iteration": floor,
                      "bytes_by_kind": {k: kinds[k] for k in COLLECTIVE_KINDS},
                      "update_bytes_per_iteration": next(
                          (p.collective_bytes for p in phases if p.name == "update"), 0),
                      "update_floor_bytes_per_iteration": next(
                          (p.floor_bytes for p in phases if p.name == "update"), 0)},
  }


def _phase_json(phase: PhaseReport, target: dict[str, Any]) -> dict[str, Any]:
  out = phase.to_json()
  if target["platform"] != "cpu":   # XLA:CPU's artefact: no such copies elsewhere
    del out["f32_weight_copy_bytes"]
  return out


def _gb(x: float) -> str:
  return f"{x / GB:.2f}"


def _unit(report: dict[str, Any]) -> tuple[float, str]:
  """GB, or MB for a model whose every phase fits in 1 GB (the tiny test models)."""
  peak = max(p["peak_bytes_per_device"] for p in report["phases"].values())
  return (GB, "GB") if peak >= GB else (1e6, "MB")


def format_report(report: dict[str, Any], top_buffers: int = 3) -> str:
  """The human-readable table `--dry_run` prints."""
  b, m = report["batch"], report["model"]
  scale, unit = _unit(report)
  fmt = lambda x: f"{x / scale:.2f}"   # noqa: E731  (in the report's unit)
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  lines = [
      f"Dry run {report['label']}: {m['params'] / 1e9:.2f} B params ({m['dtype']} compute, "
      f"{m['param_dtype']} params, remat={m['remat']}), mesh {mesh} = {report['devices']} "
      "devices",
      f"Iteration: {b['prompts']} prompts x {b['group_size']} = "
      f"{b['prompts'] * b['group_size']} responses, prompt {b['prompt_len']} + response "
      f"{b['max_new_tokens']} tokens; update {b['ppo_epochs']} epoch(s) x "
      f"{b['minibatches']} minibatch(es) x {b['micro_batches']} micro-batches; old log-probs "
      f"from the {b['old_logps']}",
      f"Figures are {report['caveat']}.",
      f"Train state per device: {fmt(report['state_bytes_per_device'])} {unit}",
      "",
      f"{'phase':15s} {'peak ' + unit:>8s} {'+resid.':>8s} {'args':>7s} {'temp':>7s}"
      f" {'out':>7s} {'alias':>7s}"
      f" {'coll. ' + unit + '/it':>11s} {'floor ' + unit + '/it':>11s} {'compile s':>9s}  function"]
  for name, p in report["phases"].items():
    lines.append(
        f"{name:15s} {fmt(p['peak_bytes_per_device']):>8s}"
        f" {fmt(p.get('peak_with_resident_bytes', p['peak_bytes_per_device'])):>8s}"
        f" {fmt(p['argument_bytes']):>7s}"
        f" {fmt(p['temp_bytes']):>7s} {fmt(p['output_bytes']):>7s} {fmt(p['alias_bytes']):>7s}"
        f" {fmt(p['collective_bytes_per_iteration']):>11s}"
        f" {fmt(p['floor_bytes_per_iteration']):>11s} {p['compile_seconds']:>9.1f}"
        f"  {p['function']}")
  c = report["collectives"]
  ratio = (c["update_bytes_per_iteration"] / c["update_floor_bytes_per_iteration"]
           if c["update_floor_bytes_per_iteration"] else float("nan"))
  ro = report.get("rollout", {})
  lines += ["", "peak: the compiled program's own buffers; +resid.: with the train state's "
            "bytes that live alongside it (optimizer moments; the f32 master params while "
            "the rollout decodes resharded ones; the previous chunk's outputs)"]
  if ro:
    rmesh = " ".join(f"{k}={v}" for k, v in ro["mesh"].items())
    how = (f"continuous batching, {ro['slots']} slots, chunks of {ro['chunk_steps']} steps"
           if ro["slots"] else "the static sampler over every response")
    lines.append(f"Rollout on mesh {rmesh}: {how}; {ro['decode_steps']} decode steps at "
                 "the worst case (every response at its cap)")
  for name, p in report["phases"].items():
    if p.get("refused"):
      lines.append(f"  {name}: not compiled, over the chip's HBM; its peak is the arguments "
                   f"plus XLA's temporaries, a lower bound ({p['refused']})")
  for name, p in report["phases"].items():
    if p.get("f32_weight_copy_bytes"):
      copies = p["f32_weight_copy_bytes"]
      lines.append(
          f"  {name}: of its peak, {fmt(copies)} {unit} are XLA:CPU's float32 copies of "
          f"the bf16 weights (a GPU/TPU keeps them bf16, half or none): peak with "
          f"bf16 copies {fmt(p['peak_bytes_per_device'] - copies / 2)} {unit}, without any "
          f"{fmt(p['peak_bytes_per_device'] - copies)} {unit}")
  lines += ["", f"Collectives per iteration: {fmt(c['bytes_per_iteration'])} {unit} per "
            f"device (FSDP floor {fmt(c['floor_bytes_per_iteration'])} {unit}); update "
            f"{fmt(c['update_bytes_per_iteration'])} {unit} = {ratio:.2f} x its floor",
            "  by kind: " + ", ".join(f"{k} {fmt(v)} {unit}"
                                      for k, v in c["bytes_by_kind"].items() if v)]
  for name, p in report["phases"].items():
    kinds = ", ".join(f"{k} {fmt(v)}" for k, v in p["collective_bytes_by_kind"].items() if v)
    if kinds:
      lines.append(f"  {name}: {kinds} {unit}")
    if "decode_bytes_per_step" in p:
      lines.append(f"  {name}: {p['decode_loops']} decode loop(s), "
                   f"{p['decode_bytes_per_step'] / 1e6:.1f} MB of collectives per token step")
  lines += ["", f"Largest buffers per device ({unit}):"]
  for name, p in report["phases"].items():
    for buf in p["largest_buffers"][:top_buffers]:
      runs = f" x{buf['executions']} runs" if buf["executions"] > 1 else ""
      lines.append(f"  {name:15s} {fmt(buf['bytes']):>7s} {buf['shape']:32s} "
                   f"{buf['opcode']}{runs}  {buf['op_name'][-70:]}")
  return "\n".join(lines)


def check_fits(report: dict[str, Any], device_memory_gb: float) -> str | None:
  """One line naming the first phase whose peak (with the bytes resident alongside it)
  exceeds the device memory, else None."""
  cpu = report.get("target", {"platform": "cpu"})["platform"] == "cpu"
  for name, p in report["phases"].items():
    need = p.get("peak_with_resident_bytes", p["peak_bytes_per_device"])
    if need > device_memory_gb * GB:
      return (f"error: phase {name!r} needs {_gb(need)} GB per device"
              f" > --device_memory_gb={device_memory_gb:g}"
              f"{' (estimate +-30%)' if cpu else ''}: raise "
              "ppo.micro_batches, add devices or set model.remat (rollout: lower "
              "rollout.slots or raise rollout.tensor)")
  return None


# ---------------------------------------------------------------------------------------
# The command-line edge (`experiments.main --dry_run`).

class DryRunError(ValueError):
  """Bad dry-run input; the message is one line naming the cause."""


_TOPOLOGY = re.compile(r"v\d+[a-z]*:\d+(x\d+){1,2}")
# libtpu's slice names -> the accelerator-type prefix a TPU VM's metadata would give.
_ACCELERATOR_TYPE = {"v5e": "v5litepod", "v6e": "v6e"}


def tpu_devices(topology: str) -> list[Any]:
  """The compile-only devices of the TPU slice `topology` (libtpu's names: generation and
  chips per dimension, "v5e:4x4", "v5p:2x2x2"): meshes of them compile for that chip
  without one (deviceless ahead-of-time compilation, MaxText's train_compile), nothing
  runs. Needs libtpu (`TPU_AOT_INSTALL`); JAX's host side stays on the CPU. Raises
  DryRunError naming --dry_run_topology before anything is compiled."""
  flag = f"--dry_run_topology={topology}"
  if not _TOPOLOGY.fullmatch(topology):
    raise DryRunError(f"{flag}: give a TPU slice as generation:chips, e.g. v5e:4x4 or "
                      "v5p:2x2x2")
  if importlib.util.find_spec("libtpu") is None:
    raise DryRunError(f"{flag}: compiling for a TPU without one needs libtpu: "
                      f"{TPU_AOT_INSTALL}")
  from jax._src import xla_bridge
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")   # no attached TPU to look for
  # libtpu reads the slice's hosts from these (a TPU VM's metadata) and logs two
  # warnings without them; the compiled programs do not depend on them (checked: the
  # same figures with another accelerator type).
  generation, _, chips = topology.partition(":")
  accelerator = _ACCELERATOR_TYPE.get(generation, generation)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{accelerator}-{math.prod(int(n) for n in chips.split('x'))}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu locks /tmp/libtpu_lockfile per process for the chips it drives; compiling
  # drives none, so two dry runs (or one beside training on a TPU VM) may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as err:   # pylint: disable=broad-except  (JaxRuntimeError: a bad slice)
    raise DryRunError(f"{flag}: libtpu refused it: "
                      f"{str(err).strip().splitlines()[0]}") from None


def use_devices(num_devices: int) -> None:
  """Makes JAX start with `num_devices` fake CPU devices (before its backend starts)."""
  if num_devices < 1:
    raise DryRunError(f"--dry_run_devices={num_devices}: use >= 1 (0 = the real devices)")
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    if jax.default_backend() == "cpu" and jax.device_count() == num_devices:
      return
    raise DryRunError(f"--dry_run_devices={num_devices}: JAX already started with "
                      f"{jax.device_count()} {jax.default_backend()} devices; pass the flag "
                      "before anything touches a device")
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", num_devices)


def spec_from_config(c) -> DryRunSpec:
  """Model shapes from `model.path`'s config.json, else the backbone preset (`model.name`
  for "hf", else `model.preset`); no weights, tokenizer or data are read. Token ids
  (EOS, pad, segment delimiter) are placeholders: no shape depends on them."""
  from egpo_jax.models import config as model_config_lib
  from egpo_jax.training import config as config_lib
  from egpo_jax.training import experiment, iteration
  r, original = c.rollout, c
  rollout = {"slots": int(r.get("slots", 0)), "chunk_steps": int(r.get("chunk_steps", 32)),
             "rollout_tensor": int(r.get("tensor", 0))}
  if c.task.name == "jsonl" and not c.task.train_file:
    # No data is read: check the rest as for the in-memory task (no shape depends on it);
    # the host-mode-only rollout fields are kept aside (checked as host mode would).
    c = config_lib.with_overrides(c, {"task.name": "synthetic", **{
        f"rollout.{k}": 0 for k in ("slots", "tensor") if k in r}})
  c = config_lib.checked(c)
  m = c.model
  if m.path:
    model_config = model_config_lib.load_hf_config(m.path, dtype=m.dtype,
                                                   remat=m.remat_policy or m.remat,
                                                   attention=m.attention)
  else:
    name = m.name if m.preset == "hf" else m.preset
    try:
      model_config = model_config_lib.get_config(name, dtype=m.dtype,
                                                 remat=m.remat_policy or m.remat,
                                                 attention=m.attention)
    except KeyError as err:
      raise DryRunError(f"config.model.name={name!r}: {err.args[0]}") from None
  delimiter = (1,) if c.algo.entropy_segment != "joint" else None
  settings = config_lib.iteration_settings(c, eos_ids=(0,), pad_id=0,
                                           delimiter_ids=delimiter)
  algo = jax.eval_shape(lambda: iteration.AlgoArrays.create(
      c.algo.variant, lam_min=c.algo.lam_min, lam_max=c.algo.lam_max))
  optimizer = experiment.rl_optimizer(c, int(c.train.iterations))
  label = f"{c.algo.advantage} on {m.path or m.name or m.preset}"
  return DryRunSpec(model_config, settings, optimizer, algo, int(c.task.max_prompt_len),
                    label, **rollout,
                    continuous=experiment.continuous_spec(original, settings.sampling))


def unsplit_warnings(spec: DryRunSpec, mesh: Mesh) -> list[str]:
  """What the mesh cannot split and so replicates: parameter dimensions
  (`sharding.unsplit_params`) and batch rows that data x fsdp does not divide."""
  lines = sharding.unsplit_params(sharding.abstract_params(spec.model_config), mesh)
  batch_devices = math.prod(mesh.shape[a] for a in sharding.BATCH)
  s, u = spec.settings, spec.settings.update
  rows = s.prompts_per_batch * s.group_size
  for what, n in (("prompts", s.prompts_per_batch), ("responses", rows),
                  ("rows per micro-batch", rows // max(u.minibatches * u.micro_batches, 1))):
    if batch_devices > 1 and n % batch_devices:
      lines.append(f"{what}: {n} are not split over data x fsdp = {batch_devices} (which "
                   "does not divide them): every device of the batch axes computes all of them")
  return lines


def run(c, *, devices: int = 0, topology: str = "", log=None, warn=None) -> dict[str, Any]:
  """The dry run of config `c` as the report dict (`report_json`) on `devices` fake CPU
  devices (0: JAX's devices) or the TPU slice `topology` (`tpu_devices`); raises
  DryRunError (or config.ConfigError) on bad input before compiling anything. `warn`
  gets one line per dimension the mesh cannot split (`unsplit_warnings`), before
  compiling."""
  from egpo_jax.training import distributed
  if devices and topology:
    raise DryRunError(f"--dry_run_devices={devices} with --dry_run_topology={topology}: "
                      "give one (the topology fixes the device count)")
  if topology:
    targets = tpu_devices(topology)
    flag = f"--dry_run_topology={topology}: {len(targets)} devices"
  else:
    if devices:
      use_devices(devices)
    targets = jax.devices()
    flag = f"--dry_run_devices={devices or len(targets)}"
  spec = spec_from_config(c)
  try:
    mesh = distributed.mesh_from_config(c, devices=targets)
  except ValueError as err:
    raise DryRunError(f"{err} ({flag})") from None
  cfg = spec.model_config
  try:
    rmesh = distributed.rollout_mesh(mesh, spec.rollout_tensor, num_heads=cfg.num_heads,
                                     num_kv_heads=cfg.num_kv_heads)
  except ValueError as err:
    raise DryRunError(f"{err} ({flag})") from None
  warnings = unsplit_warnings(spec, mesh)
  if rmesh is not mesh:
    warnings += ["rollout mesh: " + line for line in sharding.unsplit_params(
        sharding.abstract_params(cfg), rmesh)]
  for line in warnings:
    (warn or (lambda _msg: None))(line)
  from jax._src import config as jax_config
  # JAX's persistent cache cannot load a compile-only TPU executable back (no TPU client):
  # none is written, so none is read.
  with jax_config.persistent_cache_min_compile_time_secs(
      math.inf if topology else jax_config.persistent_cache_min_compile_time_secs.value):
    phases = run_phases(spec, mesh, log=log)
  state = abstract_state(spec.model_config, spec.optimizer, mesh)
  return dict(report_json(phases, spec, mesh, sharding.per_device_bytes(state), rmesh,
                          topology=topology), warnings=warnings)


def main(c, *, devices: int = 0, topology: str = "", json_path: str = "",
         device_memory_gb: float = 0.0) -> int:
  """`experiments.main --dry_run`: prints the report; 0 when every phase fits, 1 when a
  phase exceeds `device_memory_gb` (0 with a TPU topology: its chip's HBM, where
  `TPU_HBM_GIB` knows it), 2 on bad input (one line on stderr)."""
  try:
    if device_memory_gb < 0:
      raise DryRunError(f"--device_memory_gb={device_memory_gb:g}: use > 0 (0 = no check, "
                        "or a TPU topology's HBM)")
    report = run(c, devices=devices, topology=topology,
                 log=lambda msg: print(f"dry run: {msg}", flush=True),
                 warn=lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
  except (ValueError, OSError) as err:   # DryRunError, ConfigError, a missing config.json
    print("error: " + (str(err).splitlines()[0] if str(err) else repr(err)), file=sys.stderr)
    return 2
  print(format_report(report))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=1)
  hbm = report["target"].get("hbm_bytes_per_device", 0)
  if not device_memory_gb and hbm:
    device_memory_gb = hbm / GB
    print(f"Memory check: {report['target']['device_kind']} has {hbm / 2**30:g} GiB = "
          f"{device_memory_gb:.2f} GB of HBM per device (--device_memory_gb sets another)")
  if device_memory_gb:
    problem = check_fits(report, device_memory_gb)
    if problem:
      print(problem, file=sys.stderr)
      return 1
  return 0

"""The layering of docs/ARCHITECTURE.md, checked on the source: no egpo_jax module imports
from a layer above its own. Imports are read with `ast` from every module, function-local
ones included (a lazy import is still a dependency)."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "egpo_jax")

# Layer of a module: the longest matching prefix decides. A module may import its own
# layer and the layers below, never one above (docs/ARCHITECTURE.md, "Layers").
LAYERS = {
    "egpo_jax": 0,                  # the package root and egpo_jax.types
    "egpo_jax.core": 0,             # pure maths of the training path, the registries
    "egpo_jax.models": 1,
    "egpo_jax.sampling": 1,
    "egpo_jax.rewards": 1,
    "egpo_jax.data": 1,
    "egpo_jax.training": 2,
    "egpo_jax.evaluation": 2,
    # The programs that run whole experiments: they use training and evaluation, and
    # nothing below them may use them.
    "egpo_jax.training.train": 3,
    "egpo_jax.training.ablation": 3,
    "egpo_jax.training.dry_run": 3,
    "egpo_jax.training.memory": 3,
    "experiments": 4,               # the command-line tools, outside the package
}

# Known upward edges, each to be deleted once its import is gone. Keep this list short.
ALLOWED = {
    # core.logprobs places its chunked activations with the model's sharding helper
    # (`sharding.constrain`); moving that helper below models removes the edge.
    ("egpo_jax.core.logprobs", "egpo_jax.models.sharding"),
}


def layer(module: str) -> int:
  parts = module.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in LAYERS:
      return LAYERS[".".join(parts[:i])]
  raise KeyError(f"{module} has no layer: add its package to LAYERS and to "
                 "docs/ARCHITECTURE.md")


def _module_name(path: str, root: str = ROOT) -> str:
  rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _is_module(name: str, root: str) -> bool:
  base = os.path.join(root, *name.split("."))
  return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def imports(path: str, root: str = ROOT) -> set[str]:
  """Every egpo_jax/experiments module that `path` imports, at any depth of its code."""
  module = _module_name(path, root)
  is_pkg = path.endswith("__init__.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: resolve against this module's package
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:   # `from pkg import sub` imports the module pkg.sub
        out.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}", root) else base)
  return {m for m in out if m.split(".")[0] in ("egpo_jax", "experiments")}


def _sources():
  for d, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        yield os.path.join(d, name)


def upward_edges() -> set[tuple[str, str]]:
  edges = set()
  for path in _sources():
    src = _module_name(path)
    for dst in imports(path):
      if layer(dst) > layer(src):
        edges.add((src, dst))
  return edges


def test_no_module_imports_from_a_layer_above_its_own():
  bad = sorted(upward_edges() - ALLOWED)
  assert not bad, "upward imports (docs/ARCHITECTURE.md, 'Layers'):\n" + "\n".join(
      f"  {s} (layer {layer(s)}) imports {d} (layer {layer(d)})" for s, d in bad)


# Within layer 2, evaluation reads training only through the one checkpoint reader, which
# imports no evaluation module: the trainer uses evaluation, never the other way round.
EVALUATION_MAY_READ = {"egpo_jax.training.checkpointing"}


def test_evaluation_reads_training_only_through_the_checkpoint_reader():
  for path in _sources():
    src = _module_name(path)
    if src.startswith("egpo_jax.evaluation"):
      training = {d for d in imports(path) if d.startswith("egpo_jax.training")}
      assert training <= EVALUATION_MAY_READ, (src, sorted(training - EVALUATION_MAY_READ))
  reader = os.path.join(PACKAGE, "training", "checkpointing.py")
  assert not {d for d in imports(reader) if d.startswith("egpo_jax.evaluation")}


def test_the_allow_list_holds_only_edges_that_still_exist():
  stale = sorted(ALLOWED - upward_edges())
  assert not stale, f"delete these ALLOWED entries, the imports are gone: {stale}"


def test_function_local_and_relative_imports_are_seen(tmp_path):
  """The parser sees an upward import hidden in a function, and resolves `from . import`."""
  pkg = tmp_path / "egpo_jax" / "core"
  pkg.mkdir(parents=True)
  (tmp_path / "egpo_jax" / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "sibling.py").write_text("")
  src = pkg / "lazy.py"
  src.write_text("from . import sibling\n\ndef f():\n  from egpo_jax.training import train\n")
  found = imports(str(src), root=str(tmp_path))
  assert found == {"egpo_jax.core.sibling", "egpo_jax.training"}
  assert layer("egpo_jax.training") > layer("egpo_jax.core.lazy")


def test_every_module_has_a_layer():
  for path in _sources():
    layer(_module_name(path))
  with pytest.raises(KeyError, match="no layer"):
    layer("numpy")


def _method_equations() -> set[int]:
  """Equation numbers docs/METHOD.md states: 'Eq. 5' and each of 'Eqs. 6-9'."""
  with open(os.path.join(ROOT, "docs", "METHOD.md")) as f:
    text = f.read()
  found = {int(n) for n in re.findall(r"Eq\. (\d+)", text)}
  for a, b in re.findall(r"Eqs\. (\d+)-(\d+)", text):
    found.update(range(int(a), int(b) + 1))
  return found


def test_the_method_notes_the_code_cites_are_in_the_repository():
  """Every module citing the method notes cites docs/METHOD.md, which states each
  equation number the docstrings cite (DAPO's Eq. 13 is DAPO's paper, not EGPO's)."""
  stated = _method_equations()
  missing = []
  for path in _sources():
    with open(path) as f:
      for i, line in enumerate(f, 1):
        assert "EGPO_METHOD.md" not in line, f"{path}:{i} cites a file not in the repository"
        if "DAPO" in line or "2503.14476" in line:
          continue
        cited = {int(n) for n in re.findall(r"Eqs?\. (\d+)", line)}
        for a, b in re.findall(r"Eqs?\. (\d+)-(\d+)", line):
          cited.update(range(int(a), int(b) + 1))
        missing += [f"{path}:{i}: Eq. {n}" for n in sorted(cited - stated)]
  assert not missing, "cited but not in docs/METHOD.md:\n" + "\n".join(missing)

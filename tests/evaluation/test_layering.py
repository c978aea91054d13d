"""Evaluation sits below training: no evaluation module imports the training job (the
only training module it reads is the checkpoint reader, which imports no evaluation),
so `training.train -> evaluation` is the one direction of the arrow."""

import ast
import os

import egpo_jax

PACKAGE = os.path.dirname(egpo_jax.__file__)
ALLOWED = {"egpo_jax.training.checkpointing"}   # the one checkpoint reader


def _imports_of_source(source: str) -> set[str]:
  """Every egpo_jax module `source` imports, function-local imports included."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("egpo_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("egpo_jax"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if os.path.exists(_path(sub)) else node.module)
  return out


def _path(module: str) -> str:
  return os.path.join(PACKAGE, *module.split(".")[1:]) + ".py"


def _imports(module: str) -> set[str]:
  with open(_path(module)) as f:
    return _imports_of_source(f.read())


def _closure(module: str) -> set[str]:
  seen, todo = set(), [module]
  while todo:
    m = todo.pop()
    if m in seen or not os.path.exists(_path(m)):
      continue
    seen.add(m)
    todo.extend(_imports(m))
  return seen


def _evaluation_modules() -> list[str]:
  folder = os.path.join(PACKAGE, "evaluation")
  return sorted(f"egpo_jax.evaluation.{n[:-3]}" for n in os.listdir(folder)
                if n.endswith(".py") and n != "__init__.py")


def test_evaluation_imports_no_training_module_but_the_checkpoint_reader():
  for module in _evaluation_modules():
    training = {m for m in _imports(module) if m.startswith("egpo_jax.training")}
    assert training <= ALLOWED, (module, sorted(training - ALLOWED))


def test_the_checkpoint_reader_imports_no_evaluation():
  for module in ALLOWED:
    climbs = {m for m in _closure(module) if m.startswith("egpo_jax.evaluation")}
    assert not climbs, (module, sorted(climbs))


def test_the_checker_sees_function_local_imports():
  # The old loading.read_workdir imported training.train inside the function.
  assert "egpo_jax.training.train" in _imports_of_source(
      "def f():\n  from egpo_jax.training import checkpointing, train\n")


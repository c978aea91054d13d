"""Creates the peers' virtualenvs (outside the repository), one per system, resumable.

    python -m benchmarks.peers.venvs [--only trl,tunix] [--force]

Each peer's requirements are installed in order from the configured package index
(`pip config list`); TRL gets the CPU build of torch pinned first so that its
dependencies do not pull another one. A venv whose marker file records the same
requirements is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from benchmarks.peers import spec

# Installed in this order (one pip call per line).
REQUIREMENTS = {
    "trl": (("torch==2.13.0",), ("trl==1.16.0",)),
    "tunix": (("google-tunix==0.1.7",),),
}
_MARKER = "egpo_jax_peer.json"


def venv_dir(peer: str) -> str:
  return os.path.join(spec.cache_dir(), "venvs", peer)


def python(peer: str) -> str:
  return os.path.join(venv_dir(peer), "bin", "python")


def is_ready(peer: str) -> bool:
  try:
    with open(os.path.join(venv_dir(peer), _MARKER)) as f:
      return json.load(f) == {"requirements": [list(r) for r in REQUIREMENTS[peer]]}
  except (OSError, ValueError):
    return False


def _base_python() -> str:
  """The interpreter this venv was made from (peers get the same Python version)."""
  name = f"python{sys.version_info.major}.{sys.version_info.minor}"
  candidate = os.path.join(sys.base_prefix, "bin", name)
  return candidate if os.path.exists(candidate) else (shutil.which(name) or sys.executable)


def create(peer: str, *, force: bool = False) -> str:
  """Creates (or keeps) the venv of `peer`; returns its python."""
  if peer not in REQUIREMENTS:
    raise ValueError(f"unknown peer {peer!r}; known: {sorted(REQUIREMENTS)}")
  path = venv_dir(peer)
  if is_ready(peer) and not force:
    print(f"{peer}: {path} is ready", flush=True)
    return python(peer)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  subprocess.run([_base_python(), "-m", "venv", path], check=True)
  for reqs in REQUIREMENTS[peer]:
    print(f"{peer}: pip install {' '.join(reqs)}", flush=True)
    subprocess.run([python(peer), "-m", "pip", "install", "-q", *reqs], check=True)
  with open(os.path.join(path, _MARKER), "w") as f:
    json.dump({"requirements": [list(r) for r in REQUIREMENTS[peer]]}, f)
  return python(peer)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--only", default=",".join(REQUIREMENTS))
  parser.add_argument("--force", action="store_true", help="recreate existing venvs")
  args = parser.parse_args()
  for peer in [p for p in args.only.split(",") if p]:
    create(peer, force=args.force)


if __name__ == "__main__":
  main()

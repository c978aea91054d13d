"""The command-line convention of experiments/: absl flags, spelled with underscores.

Each tool keeps its flags in its own `flags.FlagValues` (several tools, and
experiments.main's --config, live in one process in the tests) and parses with `parse`:

    FLAGS = flags.FlagValues()
    _OUT = flags.DEFINE_string("out", None, "output folder", flag_values=FLAGS)

    def main(argv=None) -> int:
      try:
        positional = cli.parse(FLAGS, argv, doc=__doc__, renamed={"max-shard-gb": "max_shard_gb"})
      except cli.Exit as done:
        return done.code

--help prints the tool's docstring and flags (exit 0); a bad flag or value is one line on
stderr, "error: ...", and exit 2, before the tool does anything. A flag renamed to this
convention keeps its old spelling, with a warning on stderr that names the new one.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping, Sequence

from absl import flags

USAGE_ERROR = 2
HELP = ("--help", "-h", "--helpfull")


class Exit(Exception):
  """The tool stops here with `code` (help shown, or a bad flag reported)."""

  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


def error(message: str) -> Exit:
  """Prints `message` as the tool's one-line error; raise the returned Exit (code 2)."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  return Exit(USAGE_ERROR)


def respell(argv: Sequence[str], renamed: Mapping[str, str]) -> list[str]:
  """argv with each old flag spelling (`--byte-special-tokens[=v]`) replaced by the new
  one, and a deprecation warning on stderr for each old spelling used."""
  out, warned = [], set()
  for i, arg in enumerate(argv):
    if arg == "--":
      return out + list(argv[i:])
    name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    if name in renamed:
      if name not in warned:
        print(f"warning: --{name} is deprecated; use --{renamed[name]}", file=sys.stderr)
        warned.add(name)
      arg = f"--{renamed[name]}{eq}{value}"
    out.append(arg)
  return out


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, *, doc: str,
          renamed: Mapping[str, str] | None = None) -> list[str]:
  """Parses argv (without the program name; default sys.argv[1:]) into `fv`, every flag
  not given at its default; returns the positional arguments. Raises Exit."""
  argv = list(sys.argv[1:] if argv is None else argv)
  head = argv[:argv.index("--")] if "--" in argv else argv
  if any(a in HELP for a in head):
    print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
    raise Exit(0)
  argv = respell(argv, renamed or {})
  fv.unparse_flags()   # a second call in one process starts from the defaults again
  try:
    return fv(["tool"] + argv)[1:]
  except flags.Error as err:
    raise error(str(err)) from None


def namespace(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed values as attributes (args.checkpoint, ...)."""
  return types.SimpleNamespace(**fv.flag_values_dict())

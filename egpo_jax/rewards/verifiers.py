"""Answer checkers for verifiable rewards: pure Python, stdlib plus math-verify, no jax.

Every checker takes a model response and a reference answer (strings) and returns
`(correct, reason)`. The answer is the content of the response's LAST `\\boxed{...}`
(paper Eq. 1), found with a brace-balanced scanner rather than math-verify's own
extraction, which may return an earlier box. Equivalence of math answers is math-verify's.

This file is also the verification pool's worker program: `pool.py` runs it by path in a
fresh interpreter (`python -I file --worker`), so it must import nothing from egpo_jax
and nothing heavy at module level; the worker never imports jax.
"""

from __future__ import annotations

import contextlib
import fractions
import functools
import json
import logging
import os
import re
import signal
import sys
import threading

KINDS = ("math", "gsm8k", "multiple_choice", "synthetic")

# `\boxed{` or `\fbox{` (optionally `\boxed {`); `\boxed 5` is not a box.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SYNTHETIC_BOX = "\\boxed{"
# The synthetic task's answer grammar; the jnp verifier in data/synthetic.py mirrors it.
SYNTHETIC_MAX_DIGITS = 9
_SYNTHETIC_ANSWER_RE = re.compile(r"(-?)([0-9]{1,%d})\}" % SYNTHETIC_MAX_DIGITS)


class VerificationTimeout(BaseException):
  """Raised by the alarm; a BaseException so that math-verify's `except Exception` passes it."""


def _closing_brace(text: str, open_index: int) -> int:
  """Index of the brace closing text[open_index] == '{', or -1 if unbalanced."""
  depth = 0
  i, n = open_index, len(text)
  while i < n:
    c = text[i]
    if c == "\\":  # `\{`, `\}` and `\\` are escapes, not grouping.
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return -1


def last_boxed(text: str) -> str | None:
  """The content of the last top-level `\\boxed{...}` of text.

  None when there is no box or the last one is unbalanced (an unclosed box swallows the
  rest of the text, so it is the last one, and it is malformed). A box nested inside
  another belongs to the outer one.
  """
  pos, last = 0, None
  while True:
    m = _BOX_RE.search(text, pos)
    if m is None:
      return last
    end = _closing_brace(text, m.end() - 1)
    if end < 0:
      return None
    last = text[m.end():end]
    pos = end + 1


# --- units ---------------------------------------------------------------------------
# math-verify drops units, so `5\text{ cm}` equals `5\text{ m}`. When both the reference
# and the answer name units and these share none, the answer is wrong.
_UNIT_GROUPS = {
    "mm": "millimeter millimeters millimetre millimetres",
    "cm": "centimeter centimeters centimetre centimetres",
    "m": "meter meters metre metres",
    "km": "kilometer kilometers kilometre kilometres",
    "in": "inch inches",
    "ft": "foot feet",
    "yd": "yard yards",
    "mi": "mile miles",
    "mg": "milligram milligrams",
    "g": "gram grams",
    "kg": "kilogram kilograms kilo kilos",
    "lb": "lbs pound pounds",
    "oz": "ounce ounces",
    "ms": "millisecond milliseconds",
    "s": "sec secs second seconds",
    "min": "mins minute minutes",
    "h": "hr hrs hour hours",
    "day": "days",
    "week": "weeks",
    "month": "months",
    "year": "years yr yrs",
    "dollar": "dollars usd",
    "cent": "cents",
    "degree": "degrees deg circ",
    "radian": "radians rad",
    "l": "liter liters litre litres",
    "ml": "milliliter milliliters millilitre millilitres",
    "mph": "",
    "k": "kelvin",
    "j": "joule joules",
    "w": "watt watts",
    "n": "newton newtons",
    "pa": "pascal pascals",
    "ev": "",
    "erg": "ergs",
}
_UNIT_ALIASES = {alias: unit for unit, aliases in _UNIT_GROUPS.items()
                 for alias in (unit, *aliases.split())}
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textrm|mathrm|mbox|rm)\s*\{([^{}]*)\}")


def unit_words(latex: str) -> set[str]:
  """Canonical unit names written in `\\text{}`-like groups (and `^\\circ`) of latex."""
  words = []
  for group in _TEXT_GROUP_RE.findall(latex):
    words.extend(re.findall(r"[A-Za-z]+", group))
  if re.search(r"\^\s*\{?\\circ", latex) or "°" in latex:
    words.append("degree")
  units = {_UNIT_ALIASES.get(w.lower()) for w in words}
  return {u for u in units if u is not None}


def units_disagree(reference: str, answer: str) -> bool:
  ref_units, ans_units = unit_words(reference), unit_words(answer)
  return bool(ref_units) and bool(ans_units) and not ref_units & ans_units


# --- math-verify -----------------------------------------------------------------------
class _DropTimeoutDisabled(logging.Filter):
  """math-verify warns when its signal timeouts are off; ours (the alarm below) are on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _math_verify():
  import math_verify  # pylint: disable=g-import-not-at-top
  for name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(name).addFilter(_DropTimeoutDisabled())
  configs = [math_verify.LatexExtractionConfig(boxed_match_priority=0),
             math_verify.ExprExtractionConfig()]
  # The first parse builds the LaTeX parser (~1 s): do it here, outside any item's timeout.
  math_verify.verify(math_verify.parse("\\boxed{\\frac{1}{2}}", configs, parsing_timeout=None),
                     math_verify.parse("\\boxed{0.5}", configs, parsing_timeout=None),
                     timeout_seconds=None)
  return math_verify, configs


def _parse_boxed(content: str):
  mv, configs = _math_verify()
  # math-verify's own timeouts use signal.alarm, which would cancel ours: they are off.
  return mv.parse("\\boxed{" + content + "}", configs, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
  return _parse_boxed(reference)


def _reference_answer(reference: str) -> str:
  """A reference given as a whole solution is reduced to its last box."""
  if _BOX_RE.search(reference):
    boxed = last_boxed(reference)
    if boxed is not None:
      return boxed
  return reference.strip()


def check_math(response: str, reference: str) -> tuple[bool, str]:
  """LaTeX math answer: the last box of response against reference, by math-verify."""
  answer = last_boxed(response)
  if answer is None:
    return False, "no boxed answer"
  if not answer.strip():
    return False, "empty box"
  reference = _reference_answer(reference)
  if not reference:
    return False, "empty reference"
  if units_disagree(reference, answer):
    return False, "units differ"
  mv, _ = _math_verify()
  gold = _parse_reference(reference)
  pred = _parse_boxed(answer)
  if not pred:
    return False, "unparsable answer"
  ok = mv.verify(gold, pred, timeout_seconds=None)
  return bool(ok), "match" if ok else "mismatch"


# --- GSM8K ---------------------------------------------------------------------------
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{([-+]?\d+)\}")
_SLASH_RE = re.compile(r"([-+]?\d+)/(\d+)")


def plain_number(text: str) -> fractions.Fraction | None:
  """A plain number written with optional $, %, thousands commas and unit text, exactly.

  None when text is anything else (then the caller falls back to math-verify).
  """
  s = _TEXT_GROUP_RE.sub(" ", text)
  for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\ ", "{,}", "\\left", "\\right"):
    s = s.replace(junk, "," if junk == "{,}" else " ")
  s = s.strip().rstrip(".").strip()
  s = re.sub(r"\s+", "", s)
  if len(s) > 64:
    return None
  m = _FRAC_RE.fullmatch(s)
  if m:
    sign, num, den = m.groups()
    if int(den) == 0:
      return None
    value = fractions.Fraction(int(num), int(den))
    return -value if sign == "-" else value
  m = _SLASH_RE.fullmatch(s)
  if m:
    return None if int(m.group(2)) == 0 else fractions.Fraction(int(m.group(1)), int(m.group(2)))
  if _THOUSANDS_RE.fullmatch(s):
    s = s.replace(",", "")
  if _NUMBER_RE.fullmatch(s):
    return fractions.Fraction(s)
  return None


def check_gsm8k(response: str, reference: str) -> tuple[bool, str]:
  """Numeric answer: exact comparison of plain numbers, math-verify for anything else."""
  answer = last_boxed(response)
  if answer is None:
    return False, "no boxed answer"
  if not answer.strip():
    return False, "empty box"
  gold = plain_number(_reference_answer(reference))
  pred = plain_number(answer)
  if gold is not None and pred is not None:
    return (True, "match") if gold == pred else (False, "mismatch")
  return check_math(response, reference)


# --- multiple choice -----------------------------------------------------------------
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LETTER_RE = re.compile(r"\(?([A-Za-z])\)?(?:[.:)]?(?:\s.*)?)?", re.S)


def choice_letter(text: str) -> str | None:
  """`B`, `(B)`, `\\text{(B)}`, `B. 42`, `b` -> 'B'; None for anything else."""
  s = text
  for _ in range(3):  # unwrap nested \text{\textbf{...}}
    s = _WRAPPER_RE.sub(r"\1", s)
  s = s.strip().strip("$").strip()
  m = _LETTER_RE.fullmatch(s)
  return m.group(1).upper() if m else None


def check_multiple_choice(response: str, reference: str) -> tuple[bool, str]:
  answer = last_boxed(response)
  if answer is None:
    return False, "no boxed answer"
  letter = choice_letter(answer)
  if letter is None:
    return False, "not a choice letter"
  gold = choice_letter(reference)
  if gold is None:
    return False, "reference is not a choice letter"
  return (True, "match") if letter == gold else (False, "mismatch")


# --- synthetic arithmetic --------------------------------------------------------------
def synthetic_answer(text: str) -> int | None:
  """The integer in the last `\\boxed{` of text: `-?[0-9]{1,9}` then `}`; else None.

  The same grammar as the jnp verifier (`egpo_jax.data.synthetic.verify`): the last
  occurrence of the 7 characters `\\boxed{`, an optional minus, 1 to 9 ASCII digits and a
  closing brace right after them. Anything else there is malformed.
  """
  start = text.rfind(_SYNTHETIC_BOX)
  if start < 0:
    return None
  m = _SYNTHETIC_ANSWER_RE.match(text, start + len(_SYNTHETIC_BOX))
  if m is None:
    return None
  value = int(m.group(2))
  return -value if m.group(1) else value


def check_synthetic(response: str, reference: str | int) -> tuple[bool, str]:
  answer = synthetic_answer(response)
  if answer is None:
    return False, "no well-formed boxed integer"
  return (True, "match") if answer == int(reference) else (False, "mismatch")


CHECKERS = {
    "math": check_math,
    "gsm8k": check_gsm8k,
    "multiple_choice": check_multiple_choice,
    "synthetic": check_synthetic,
}


# --- timeouts --------------------------------------------------------------------------
@contextlib.contextmanager
def _alarm(seconds: float | None):
  """Raises VerificationTimeout after `seconds` (main thread only; elsewhere a no-op)."""
  usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())
  if not usable:
    yield
    return

  def on_alarm(signum, frame):
    del signum, frame
    raise VerificationTimeout()

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def check(kind: str, response: str, reference: str, timeout: float | None = 5.0
          ) -> tuple[bool, str]:
  """Runs one checker under a timeout; errors and timeouts are wrong answers.

  The timeout is a SIGALRM timer, so it applies only on the main thread; run checks
  through `VerifierPool`, whose workers also survive hangs that no signal interrupts.
  """
  fn = CHECKERS.get(kind)
  if fn is None:
    raise ValueError(f"kind={kind!r} is not a verifier; use one of {sorted(CHECKERS)}")
  if not isinstance(response, str) or not isinstance(reference, (str, int)):
    raise TypeError(f"response and reference must be strings, got {type(response).__name__} "
                    f"and {type(reference).__name__}")
  if kind in ("math", "gsm8k"):
    _math_verify()  # one-off imports and parser set-up are not the item's time
  try:
    with _alarm(timeout):
      return fn(response, reference)
  except VerificationTimeout:
    return False, "timeout"
  except RecursionError:
    return False, "error: recursion too deep"
  except Exception as e:  # pylint: disable=broad-except
    return False, f"error: {type(e).__name__}"


# --- worker program --------------------------------------------------------------------
def _worker_main() -> None:
  """JSON lines in on stdin, JSON lines out on fd 1; everything else printed goes to stderr.

  Requests: {"i": int, "kind": str, "response": str, "reference": str, "timeout": float}
  or {"op": "modules"}; replies {"i", "ok", "reason"} or {"modules": [...]}.
  """
  out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
  os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
  sys.stdout = sys.stderr
  logging.basicConfig(level=logging.ERROR)
  _math_verify()  # import sympy and friends before saying ready
  out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
  for line in sys.stdin:
    try:
      req = json.loads(line)
    except json.JSONDecodeError:
      continue
    if req.get("op") == "modules":
      reply = {"modules": sorted(sys.modules)}
    else:
      try:
        ok, reason = check(req["kind"], req["response"], req["reference"], req.get("timeout"))
      except (TypeError, ValueError, KeyError) as e:
        ok, reason = False, f"bad request: {e}"
      reply = {"i": req.get("i"), "ok": ok, "reason": reason}
    out.write(json.dumps(reply) + "\n")


if __name__ == "__main__" and "--worker" in sys.argv[1:]:
  _worker_main()

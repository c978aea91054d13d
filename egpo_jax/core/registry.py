"""Name -> function registries: the only way the trainer picks an advantage estimator, a
policy loss or a reward function.

A new variant is one decorated function plus its config; nothing else needs editing:

    @registry.advantage_estimators.register("scaled_grpo")
    def scaled_grpo(rewards_BxG, *, valid_BxG=None, adv_scale=1.0): ...

    # config: c.algo.advantage = "scaled_grpo"; c.algo.adv_scale = 3.0

The trainer calls a registered function with `call`, which passes, of everything it has
(data arrays, the config's hyperparameters), only the keywords the function declares
(`inspect.signature`, read once per trace). A hyperparameter the function declares but no
config row describes (`hyperparameters`) is read from the config section of its kind
(`algo` for estimators, `loss` for losses, `task` for reward functions) under the
parameter's own name.
`requires` is registration metadata: the inputs a function cannot do without (e.g.
EDGE-GRPO's `shannon_BxG`), so the trainer can produce them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
  """A named table of functions of one kind, with errors that list the known names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._table: dict[str, F] = {}
    self._requires: dict[str, tuple[str, ...]] = {}

  def register(self, name: str, *, overwrite: bool = False,
               requires: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator registering `fn` as `name`; `requires` names the keyword inputs `fn`
    cannot do without (each must be one of its parameters)."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
      if name in self._table and not overwrite and self._table[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is already registered; pick another name "
                         "or pass overwrite=True")
      unknown = [r for r in requires if r not in inspect.signature(fn).parameters]
      if unknown:
        raise ValueError(f"{self.kind} {name!r}: requires={unknown} are not parameters of "
                         f"{fn.__name__}")
      self._table[name] = fn
      self._requires[name] = tuple(requires)
      return fn

    return decorator

  def get(self, name: str) -> F:
    try:
      return self._table[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._table)}. "
                     f"Register one with @{self.kind.replace(' ', '_')}s.register(name)"
                     ) from None

  def requires(self, name: str) -> tuple[str, ...]:
    """The inputs `name` was registered as needing (`register(..., requires=...)`)."""
    self.get(name)
    return self._requires.get(name, ())

  def names(self) -> list[str]:
    return sorted(self._table)

  def in_order(self) -> tuple[str, ...]:
    """The names in registration order: a name added later never moves an earlier one."""
    return tuple(self._table)

  def unregister(self, name: str) -> None:
    """Removes `name` (for tests and interactive use)."""
    self.get(name)
    del self._table[name]
    self._requires.pop(name, None)

  def __contains__(self, name: object) -> bool:
    return name in self._table

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())


def _keywords(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
  params = inspect.signature(fn).parameters
  var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  named = {k: p for k, p in params.items()
           if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
  return named, var_kw


def hyperparameters(fn: Callable) -> dict[str, Any]:
  """{name: default} of the parameters of `fn` with a default: what a config may set."""
  named, _ = _keywords(fn)
  return {k: p.default for k, p in named.items() if p.default is not inspect.Parameter.empty}


def call(fn: Callable, /, *args, **available):
  """fn(*args, **kw) with kw the entries of `available` that `fn` declares (all of them
  when it takes **kwargs): hyperparameters pass by the function's signature, so a
  registered function names what it reads and nothing else must accept the rest."""
  named, var_kw = _keywords(fn)
  taken = set(list(named)[:len(args)])   # filled positionally
  return fn(*args, **{k: v for k, v in available.items()
                      if (var_kw or k in named) and k not in taken})


advantage_estimators: Registry = Registry("advantage estimator")
policy_losses: Registry = Registry("policy loss")
reward_functions: Registry = Registry("reward function")

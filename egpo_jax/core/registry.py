"""Name -> function registries, so a config picks an estimator or a loss by name.

A new variant is one decorated function; nothing else needs editing:

    @registry.advantage_estimators.register("my_grpo")
    def my_grpo(rewards_BxG, **kwargs): ...

    fn = registry.advantage_estimators.get(config.algo.advantage)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
  """A named table of functions of one kind, with errors that list the known names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._table: dict[str, F] = {}

  def register(self, name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
      if name in self._table and not overwrite and self._table[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is already registered; pick another name "
                         "or pass overwrite=True")
      self._table[name] = fn
      return fn

    return decorator

  def get(self, name: str) -> F:
    try:
      return self._table[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._table)}. "
                     f"Register one with @{self.kind.replace(' ', '_')}s.register(name)"
                     ) from None

  def names(self) -> list[str]:
    return sorted(self._table)

  def __contains__(self, name: object) -> bool:
    return name in self._table

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())


advantage_estimators: Registry = Registry("advantage estimator")
policy_losses: Registry = Registry("policy loss")
reward_functions: Registry = Registry("reward function")

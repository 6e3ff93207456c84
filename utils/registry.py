"""Registries mapping a config block's `type` to its constructor; the reference code's names
(`RegularEncoder`, `web_dataloader`, ...) are registered, some as aliases of clearer ones."""

from __future__ import annotations

from typing import Callable


class Registry:
    """Constructors by config name. `kind` ("loss", ...) names it in errors; `runtime_args` are
    constructor arguments the program supplies (`distributed`) and a config may not set."""

    def __init__(self, kind: str, runtime_args: tuple[str, ...] = ()):
        self.kind = kind
        self.runtime_args = frozenset(runtime_args)
        self._items: dict[str, Callable] = {}

    def register(self, *names: str) -> Callable:
        """Class decorator: register the class under each of `names` (default: its own name)."""

        def decorator(obj: Callable) -> Callable:
            for name in names or (obj.__name__,):
                if name in self._items:
                    raise KeyError(f"{self.kind} '{name}' is registered twice")
                self._items[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable:
        return self._items[name]


ENCODERS = Registry("encoder")
PROJECTIONS = Registry("projection", runtime_args=("input_dim",))
LOSSES = Registry("loss", runtime_args=("distributed",))
OPTIMIZERS = Registry("optimizer", runtime_args=("params", "lr"))
SCHEDULERS = Registry("lr_scheduler")
DATALOADERS = Registry("dataloader", runtime_args=("runtime",))
EVALUATORS = Registry("evaluator", runtime_args=("distributed",))

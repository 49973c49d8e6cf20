"""A small name -> object registry for what users swap by name in a config (losses, patch
planners, optimisers), modelled on the backbone registry (``backbones/registry.py``).

Registering a name twice raises, so a plugin cannot silently replace a built-in; an unknown name
raises ``ConfigError`` naming the config key and every registered choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from sap_lightning.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; ``config_key`` is the key that chooses among them."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its argument under ``name``."""

        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """Names in registration order (the built-ins first)."""
        return list(self._entries)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"'{self.config_key}' is '{name}': no such {self.kind}; "
                f"registered: {', '.join(self.names())}"
            ) from None

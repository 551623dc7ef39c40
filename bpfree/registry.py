"""Name -> factory registries with declared, typed options (shared by models and methods).

Every registered entry declares its options once; the command line turns them into flags and `build`
checks the values, so no caller needs to know any entry's internals.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpfree.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One option of a model or method: its default, a one-line help, and optional allowed values.

    The type is taken from the default: int, float, str, bool, or a tuple of ints (given as "1024,1024").
    Numbers may declare bounds where the option is declared: `minimum` / `maximum` (inclusive) and `above`
    (exclusive); for a tuple every entry is checked, and `min_items` bounds its length. Floats must be finite.
    """

    default: Any
    help: str
    choices: Sequence[str] | None = None
    type: type | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    min_items: int = 0

    @property
    def kind(self) -> type:
        return self.type or type(self.default)

    def parse(self, name: str, value: Any) -> Any:
        """Convert a command-line string (or a python value) to this option's type, or raise UsageError."""
        kind = self.kind
        try:
            if kind is tuple:
                if isinstance(value, str):
                    value = tuple(int(v) for v in value.split(",") if v.strip())
                else:
                    value = tuple(int(v) for v in value)
            elif kind is bool:
                if isinstance(value, str):
                    low = value.lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = low in ("1", "true", "yes", "on")
                else:
                    value = bool(value)
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
            elif kind is float:
                value = float(value)
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"option --{name.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"option --{name.replace('_', '-')}: {value!r} is not one of {', '.join(map(str, self.choices))}"
            )
        self.check_bounds(name, value)
        return value

    def bounds(self) -> str:
        """The declared bounds in words ("at least 1", "in (0, 1]"), or "" if none."""
        low = f"[{self.minimum:g}" if self.minimum is not None else f"({self.above:g}" if self.above is not None else ""
        if low and self.maximum is not None:
            return f"in {low}, {self.maximum:g}]"
        if self.maximum is not None:
            return f"at most {self.maximum:g}"
        if self.minimum is not None:
            return f"at least {self.minimum:g}"
        if self.above is not None:
            return f"greater than {self.above:g}"
        return ""

    def check_bounds(self, name: str, value: Any) -> None:
        """Raise UsageError naming the option and its bounds if `value` (already parsed) is outside them."""
        flag = "--" + name.replace("_", "-")
        if self.kind is tuple and len(value) < self.min_items:
            raise UsageError(f"option {flag}: needs at least {self.min_items} value(s), got {len(value)}")
        for v in value if self.kind is tuple else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"option {flag}: must be a finite number, got {v}")
            if ((self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum)
                    or (self.above is not None and v <= self.above)):
                each = "each value " if self.kind is tuple else ""
                raise UsageError(f"option {flag}: {each}must be {self.bounds()}, got {v}")


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    options: dict[str, Option] = field(default_factory=dict)
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A named collection of factories. `kind` names what is registered, for error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        description: str,
        options: dict[str, Option] | None = None,
        paper: str = "",
        **extra: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self.entries[name] = Entry(name, factory, description, dict(options or {}), paper, extra)
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else f"; choose from: {', '.join(self.names())}"
            raise UsageError(f"unknown {self.kind} {name!r}{hint}")
        return self.entries[name]

    def resolve_options(self, name: str, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and type-check the options given for entry `name` (None means not given)."""
        entry = self.get(name)
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(entry.options))
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            valid = ", ".join("--" + k.replace("_", "-") for k in entry.options) or "none"
            raise UsageError(f"{self.kind} {name!r} does not take {flags} (its options: {valid})")
        return {k: opt.parse(k, given[k]) if k in given else opt.default for k, opt in entry.options.items()}

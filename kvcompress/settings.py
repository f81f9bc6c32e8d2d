"""The settings every cache resolves in one place: the exact sink and window, the block size, and memory budgets."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, fields

import torch

MAX_TOKENS = 2**40  # a token budget beyond any context a model can hold, and far inside int64


def whole_number(name: str, value, what: str, low: int, high: int) -> int:
    """`value` as an int if it is a whole number (Python, numpy or a one-element torch integer; not a bool) in [low, high]."""
    error = ValueError(f"{name} must be {what} (an integer from {low} to {high}), got {value!r}.")
    if isinstance(value, bool):
        raise error
    try:
        number = operator.index(value)
    except TypeError:
        raise error from None
    if not low <= number <= high:
        raise error
    return number


@dataclass(frozen=True)
class Budget:
    """How many tokens a row may hold: a fixed count, or one token in `ratio` of those seen."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("Give the budget either as a token count (budget=...) or as a compression ratio (ratio=...), not both or neither.")
        if self.tokens is not None:
            object.__setattr__(self, "tokens", whole_number("budget", self.tokens, "a positive number of tokens", 1, MAX_TOKENS))
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (numbers.Real, torch.Tensor)) or not math.isfinite(float(self.ratio)) or float(self.ratio) < 1:
                raise ValueError(f"ratio must be a finite compression ratio >= 1 (e.g. 8 for 8:1), got {self.ratio!r}.")
            object.__setattr__(self, "ratio", float(self.ratio))

    def at(self, seen: torch.Tensor, settings: CacheSettings) -> torch.Tensor:
        """Tokens a row may hold after seeing `seen` real tokens (per row): the token count, or ``ceil(seen / ratio)`` but never
        fewer than the sink and one block's slack (a block leaves only when whole), which a short prompt at a ratio holds."""
        if self.tokens is not None:
            return torch.full_like(seen, self.tokens)
        return torch.ceil(seen / self.ratio).long().clamp(min=settings.sink + settings.block_size - 1)

    def room(self, seen: torch.Tensor, settings: CacheSettings) -> torch.Tensor:
        """Tokens a row may hold beyond its sink, less the slack of block-wise eviction. At ratio 1 nothing is lost: the
        room is every token."""
        if self.ratio == 1:
            return torch.full_like(seen, MAX_TOKENS)
        return self.at(seen, settings) - settings.sink - (settings.block_size - 1)

    def check(self, settings: CacheSettings) -> None:
        """Refuse settings with which a token budget cannot hold: the sink and one block's slack must fit inside it."""
        if self.tokens is None:
            return
        if settings.sink >= self.tokens:
            raise ValueError(f"sink ({settings.sink}) must be smaller than the budget ({self.tokens} tokens): the sink alone would fill it.")
        if settings.sink + settings.block_size > self.tokens:
            raise ValueError(
                f"block_size ({settings.block_size}) is too large for a budget of {self.tokens} tokens with a sink of {settings.sink}: tokens leave "
                f"in whole blocks, so up to sink + block_size - 1 tokens stay. Use block_size <= {self.tokens - settings.sink}."
            )

    def __str__(self):
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.ratio:g}:1"


@dataclass(frozen=True)
class CacheSettings:
    """What every compressed cache keeps exact and how often it compresses.

    `sink`: the first tokens of each row, always exact (attention sinks). `window`: the most recent
    tokens kept exact. `block_size`: tokens leave the window in whole blocks of this many (fewer,
    larger compressions; up to `block_size - 1` extra tokens stay exact between them).
    """

    sink: int = 4
    window: int = 64
    block_size: int = 16

    def __post_init__(self):
        for name, low in (("sink", 0), ("window", 0), ("block_size", 1)):
            object.__setattr__(self, name, whole_number(name, getattr(self, name), f"an integer >= {low}", low, MAX_TOKENS))

    @classmethod
    def resolve(cls, *layers: dict | None, **overrides) -> CacheSettings:
        """The settings from the defaults, then each of `layers` in turn (e.g. a policy's preferences, then an artifact's
        fitted settings), then the non-None `overrides` (what the user passed): later ones win."""
        names = {field.name for field in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"Unknown cache settings {sorted(unknown)}; the settings are {sorted(names)}.")
        values: dict = {}
        for layer in (*layers, overrides):
            values |= {name: value for name, value in (layer or {}).items() if name in names and value is not None}
        return cls(**values)

"""The byte model: how a memory target (``ratio=``) becomes a cache's internal setting.

A compressed cache holds a few tokens exact (the sink, the recent window, on average half a block
waiting in the tail and room for one block more) and, of the rest, a share at some cost per token relative to dense. At
`context` tokens it holds ``exact + share * (context - exact) * cost`` dense-token equivalents; the
share that makes that ``context / ratio`` is what `kept_share` returns. `nbytes()` measures what a
cache really holds; this model only sets the knob, and the benchmarks report the measured ratio.
"""

from __future__ import annotations

from collections.abc import Callable

from .settings import MAX_TOKENS, Budget, CacheSettings, whole_number

DEFAULT_CONTEXT = 4096  # tokens at which ``ratio=`` is met unless a cache is told the context it will see
DEFAULT_KEEP_RATIO = 0.125  # share of tokens leaving the window that gates keep unless calibrated or told otherwise


def kept_share(ratio: float, context: int, exact_tokens: float, cost: float = 1.0, held: Callable[[float], float] | None = None) -> float:
    """The share of the tokens beyond the `exact_tokens` to keep, at `cost` dense tokens each, so that a cache holds
    1/`ratio` of the dense bytes at `context` tokens (at most 1, to 4 digits). `held(share)`, when given, is the share of
    those tokens' slots a cache really holds when it keeps `share` of them (padding to the fullest head, room to grow)."""
    context = check_context(context)
    if context <= exact_tokens or context / ratio <= exact_tokens:
        raise ValueError(
            f"At {context} tokens the exact sink and window ({exact_tokens:g} tokens) already hold more than 1/{ratio:g} of the "
            f"cache: {ratio:g}:1 cannot be reached. Ask for a lower ratio, a longer context=, or a smaller window=."
        )
    allowed = (context / ratio - exact_tokens) / ((context - exact_tokens) * cost)
    if held is None:
        return min(1.0, max(round(allowed, 4), 1e-4))  # a share that rounds to 0 would keep nothing: the smallest that keeps some
    if held(1.0) <= allowed:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if held(middle) <= allowed else (low, middle)
    return max(round(low, 4), 1e-4)


def resolve_keep_ratio(keep_ratio: float | None, ratio: float | None, context: int, from_ratio: Callable[[], float], default: float) -> float:
    """One of `keep_ratio` (a share) or `ratio` (a memory target at `context` tokens, turned into a share by `from_ratio`), checked;
    neither: `default` (the keep ratio the gates were calibrated with, `GateCompressor.default_keep_ratio`)."""
    check_context(context)
    if keep_ratio is not None and ratio is not None:
        raise ValueError("Give either ratio= (a memory target, e.g. 8 for 8:1) or keep_ratio= (the share of old tokens to keep), not both.")
    if ratio is not None:
        return 1.0 if Budget(ratio=ratio).ratio == 1 else from_ratio()  # ratio 1: nothing is lost
    keep_ratio = default if keep_ratio is None else keep_ratio
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1] (e.g. 0.125 to keep about one token in 8), got {keep_ratio!r}.")
    return float(keep_ratio)


def slot_cost(numbers_per_token: float, head_dim: int, extra_bytes: int, dtype_bytes: int = 4) -> float:
    """Dense tokens' worth of memory of one held token-head: `numbers_per_token` numbers (of the 2 x `head_dim` of a dense key and
    value) and `extra_bytes` of bookkeeping (token id, score, bias), at `dtype_bytes` per number."""
    return (numbers_per_token * dtype_bytes + extra_bytes) / (2 * head_dim * dtype_bytes)


def window_for(ratio: float | None, window: int | None, context: int, cost: float, settings: CacheSettings, what: str) -> int | None:
    """The exact window a cache was given, or, with `ratio`, the one that meets it (`window_for_ratio`): one or the other."""
    check_context(context)
    if ratio is None:
        return window
    if window is not None:
        raise ValueError("Give either ratio= (the window follows from it) or window=, not both.")
    if Budget(ratio=ratio).ratio == 1:
        return MAX_TOKENS  # ratio 1: every token stays exact
    return window_for_ratio(ratio, context, cost, settings.sink, settings.block_size, what)


def check_context(context) -> int:
    """`context` (the tokens at which ``ratio=`` is met), checked."""
    return whole_number("context", context, "the context length in tokens at which ratio= is met", 1, MAX_TOKENS)


def window_for_ratio(ratio: float, context: int, cost: float, sink: int, block_size: int, what: str) -> int:
    """The exact recent window at which a cache that holds every older token at `cost` dense tokens holds 1/`ratio` of the
    dense bytes at `context` tokens: a lower ratio than the encoding's own buys a longer exact window."""
    fixed = sink + 1.5 * block_size  # the tail: on average half a block waiting, and room for one
    best = context / (fixed + (context - fixed) * cost)
    if ratio > best * 1.001:
        raise ValueError(
            f"{what} holds at most {best:.2f}:1 at {context} tokens (its encoding keeps {cost:.3f} of each old token), so {ratio:g}:1 "
            f"cannot be reached. Ask for at most {best:.2f}, or add eviction: ComposedCache(gate=..., lowrank=..., ratio={ratio:g})."
        )
    return max(0, int((context / ratio - context * cost) / (1 - cost) - fixed))

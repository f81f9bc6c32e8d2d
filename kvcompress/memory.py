"""The byte model: how a memory target (``ratio=``) becomes a cache's internal setting.

A compressed cache holds a few tokens exact (the sink, the recent window, on average half a block
waiting in the tail) and, of the rest, a share at some cost per token relative to dense. At
`context` tokens it holds ``exact + share * (context - exact) * cost`` dense-token equivalents; the
share that makes that ``context / ratio`` is what `kept_share` returns. `nbytes()` measures what a
cache really holds; this model only sets the knob, and the benchmarks report the measured ratio.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_CONTEXT = 4096  # tokens at which ``ratio=`` is met unless a cache is told the context it will see
# A kept token-head of the gates costs its key and value plus a token id and a gate score, and ragged heads
# pad to the fullest one: 1.1 dense tokens, as measured on SmolLM2-135M (docs/benchmarks.md).
KEPT_GATE_TOKEN_COST = 1.1


def kept_share(ratio: float, context: int, exact_tokens: float, cost: float = 1.0) -> float:
    """The share of the tokens beyond the `exact_tokens` to keep, at `cost` dense tokens each, so that a cache
    holds 1/`ratio` of the dense bytes at `context` tokens (at most 1, rounded to 4 digits)."""
    if context <= exact_tokens or context / ratio <= exact_tokens:
        raise ValueError(
            f"At {context} tokens the exact sink and window ({exact_tokens:g} tokens) already hold more than 1/{ratio:g} of the "
            f"cache: {ratio:g}:1 cannot be reached. Ask for a lower ratio, a longer context=, or a smaller window=."
        )
    return min(1.0, round((context / ratio - exact_tokens) / ((context - exact_tokens) * cost), 4))


def resolve_keep_ratio(keep_ratio: float | None, ratio: float | None, from_ratio: Callable[[], float], default: float = 0.125) -> float:
    """One of `keep_ratio` (a share) or `ratio` (a memory target, turned into a share by `from_ratio`), checked."""
    if keep_ratio is not None and ratio is not None:
        raise ValueError("Give either ratio= (a memory target, e.g. 8 for 8:1) or keep_ratio= (the share of old tokens to keep), not both.")
    if ratio is not None:
        return from_ratio()
    keep_ratio = default if keep_ratio is None else keep_ratio
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1] (e.g. 0.125 to keep about one token in 8), got {keep_ratio!r}.")
    return float(keep_ratio)

"""The honest baselines: StreamingLLM (sink + recent) and H2O (sink + recent + heavy hitters).

Both hold at most `budget` tokens per row and KV head (a fixed count, or `ceil(seen / ratio)` for a
compression ratio). Tokens are evicted in blocks of `block_size` (default 1, as in the papers); a
larger block trades up to `block_size - 1` tokens of budget for fewer cache rebuilds.
"""

from __future__ import annotations

import torch

from .cache import FILLER, Budget, CompressedCache, CompressedLayer, Slots


class _BudgetedLayer(CompressedLayer):
    """A layer whose window (and store) are sized from a token budget."""

    recent_share = 1.0

    def __init__(self, layer_idx: int, budget: Budget, sink: int = 4, block_size: int = 1):
        budget.check_sink(sink)
        super().__init__(layer_idx, sink=sink, window=0, block_size=block_size)
        self.budget = budget

    def room(self, seen: torch.Tensor) -> torch.Tensor:
        """Budget left after the sink and the slack of block-wise eviction."""
        return (self.budget.at(seen) - self.sink - (self.block_size - 1)).clamp(min=0)

    def window_size(self, seen: torch.Tensor) -> torch.Tensor:
        return (self.room(seen) * self.recent_share).long()


class StreamingLLMLayer(_BudgetedLayer):
    """Keeps the attention sink and the most recent tokens; everything older is evicted (Xiao et al. 2024)."""

    def compress_blocks(self, blocks: Slots) -> None:
        return None


class H2OLayer(_BudgetedLayer):
    """Keeps, per KV head, the tokens that received the most attention from the model's real queries.

    Half the room (by default) is the recent window; the rest holds the heavy hitters: tokens that
    left the window ranked by the attention they accumulated, summed over the query heads of the
    KV head's group (Zhang et al. 2023). Each head keeps its own tokens.
    """

    tracks_attention = True

    def __init__(self, layer_idx: int, budget: Budget, sink: int = 4, recent_share: float = 0.5, block_size: int = 1):
        if not 0.0 <= recent_share <= 1.0:
            raise ValueError(f"recent_share must be in [0, 1], got {recent_share!r}.")
        super().__init__(layer_idx, budget, sink=sink, block_size=block_size)
        self.recent_share = recent_share

    def compress_blocks(self, blocks: Slots) -> Slots:
        return blocks  # every token leaving the window is a heavy-hitter candidate; select_store bounds them

    def select_store(self, token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        heavy_room = self.room(self.seen) - self.window_size(self.seen)
        ranked = scores.masked_fill(token_ids == FILLER, float("-inf"))
        rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return rank < heavy_room[:, None, None]


class StreamingLLMCache(CompressedCache):
    """Sink + recent window. ``StreamingLLMCache(budget=256)`` or ``StreamingLLMCache(ratio=8)``."""

    layer_class = StreamingLLMLayer

    def __init__(self, budget: int | None = None, *, ratio: float | None = None, sink: int = 4, block_size: int = 1, config=None):
        super().__init__(config=config, budget=Budget(budget, ratio), sink=sink, block_size=block_size)


class H2OCache(CompressedCache):
    """Sink + recent window + per-head heavy hitters. ``H2OCache(budget=256)`` or ``H2OCache(ratio=8)``."""

    layer_class = H2OLayer

    def __init__(
        self,
        budget: int | None = None,
        *,
        ratio: float | None = None,
        sink: int = 4,
        recent_share: float = 0.5,
        block_size: int = 1,
        config=None,
    ):
        super().__init__(
            config=config, budget=Budget(budget, ratio), sink=sink, recent_share=recent_share, block_size=block_size
        )

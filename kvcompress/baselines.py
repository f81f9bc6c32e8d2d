"""The honest baselines: StreamingLLM (sink + recent) and H2O (sink + recent + heavy hitters), as keep policies.

Both hold at most `budget` tokens per row and KV head (`Budget.at`: a fixed count, or `ceil(seen / ratio)`
for a compression ratio, never fewer than the sink and one block's slack, `sink + block_size - 1`). Tokens are evicted in blocks of `block_size` (default 1, as in the papers); a
larger block trades up to `block_size - 1` tokens of budget for fewer cache rebuilds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cache import CompressedCache
from .policies import KeepPolicy, LayerView
from .settings import Budget
from .slots import FILLER, Slots, slot_index

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class RecentOnly(KeepPolicy):
    """StreamingLLM (Xiao et al. 2024): the sink and the most recent tokens fill the budget; older tokens are evicted."""

    preferred = {"block_size": 1}
    recent_share = 1.0  # of the budget left after the sink, the share that is the recent window

    def __init__(self, budget: Budget):
        self.budget = budget

    def window(self, layer: LayerView, seen: torch.Tensor) -> torch.Tensor:
        return (self.budget.room(seen, layer.settings) * self.recent_share).long()

    def choose(self, layer: LayerView, blocks: Slots) -> None:
        return None

    def __repr__(self):
        return f"{type(self).__name__}(budget={self.budget})"


class HeavyHitters(RecentOnly):
    """H2O (Zhang et al. 2023): part of the budget is the recent window, the rest holds, per KV head, the tokens that
    left it with the most attention received from the model's real queries (summed over the head's query group)."""

    needs_attention = True
    admits_when_growing = True  # the opened slot scores -inf: the leaving token always takes it, as the general path keeps it
    replaces_lowest_scored = True  # on a GPU the engine's per-token kernel admits as `admit` does (`kvcompress.token_step`)

    def __init__(self, budget: Budget, recent_share: float = 0.5):
        if isinstance(recent_share, bool) or not isinstance(recent_share, (int, float)) or not 0.0 <= recent_share <= 1.0:
            raise ValueError(f"recent_share must be a number in [0, 1], got {recent_share!r}.")
        super().__init__(budget)
        self.recent_share = recent_share

    def choose(self, layer: LayerView, blocks: Slots) -> Slots:
        return blocks  # every token leaving the window is a candidate; `bound` keeps the heaviest

    def bound(self, layer: LayerView, token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        heavy_room = self.budget.room(layer.seen, layer.settings) - self.window(layer, layer.seen)
        ranked = scores.masked_fill(token_ids == FILLER, float("-inf"))
        rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return rank < heavy_room[:, None, None]

    def admit(self, layer: LayerView, leaving: dict) -> None:
        """The token leaving the window replaces each head's lowest-scored heavy hitter, unless it scores no higher.

        Ties go as in `bound`'s stable ranking: the newcomer first, then the latest of the lowest-scored.
        A store with no room for heavy hitters (a short prompt at a ratio, or recent_share=1) takes nothing.
        """
        store = layer.store
        if store["scores"].shape[-1] == 0:
            return
        lowest = store["scores"].shape[-1] - 1 - store["scores"].flip(-1).argmin(-1, keepdim=True)  # [B, H, 1]
        replace = leaving["scores"] > store["scores"].gather(-1, lowest)
        for name in ("keys", "values", "token_ids", "scores"):
            slots, index = store[name], slot_index(lowest, store[name])
            slots.scatter_(2, index, torch.where(slot_index(replace, slots[..., :1]), leaving[name], slots.gather(2, index)))

    def __repr__(self):
        return f"{type(self).__name__}(budget={self.budget}, recent_share={self.recent_share:g})"


class StreamingLLMCache(CompressedCache):
    """Sink + recent window. ``StreamingLLMCache(budget=256)`` or ``StreamingLLMCache(ratio=8)``."""

    def __init__(self, budget: int | None = None, *, ratio: float | None = None, sink: int = 4, block_size: int = 1, config: PretrainedConfig | None = None) -> None:
        super().__init__(RecentOnly(Budget(budget, ratio)), sink=sink, block_size=block_size, config=config)


class H2OCache(CompressedCache):
    """Sink + recent window + per-head heavy hitters. ``H2OCache(budget=256)`` or ``H2OCache(ratio=8)``."""

    def __init__(
        self, budget: int | None = None, *, ratio: float | None = None, sink: int = 4, recent_share: float = 0.5, block_size: int = 1, config: PretrainedConfig | None = None,
    ) -> None:
        super().__init__(HeavyHitters(Budget(budget, ratio), recent_share), sink=sink, block_size=block_size, config=config)

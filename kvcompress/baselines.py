"""The honest baselines: StreamingLLM (sink + recent) and H2O (sink + recent + heavy hitters).

Both hold at most `budget` tokens per row and KV head (a fixed count, or `ceil(seen / ratio)` for a
compression ratio). Tokens are evicted in blocks of `block_size` (default 1, as in the papers); a
larger block trades up to `block_size - 1` tokens of budget for fewer cache rebuilds.
"""

from __future__ import annotations

import torch

from .cache import FILLER, Budget, CompressedCache, CompressedLayer, Slots, _views


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

    def _admit(self, leaving: dict) -> None:
        """Let a full store that stays full take the token leaving the window (its slot ``[B, H, 1, ...]`` per tail
        tensor) in place of one of its own; by default it takes nothing (StreamingLLM evicts the token)."""

    def _compress(self) -> None:
        if not self._hand_one_in_place():
            super()._compress()

    def _hand_one_in_place(self) -> bool:
        """The usual per-token step in a few dozen small kernels without a device sync: the oldest token leaves the window,
        its slot is filled by the tail's last one, and `_admit` decides what the store keeps.

        Only when rows are aligned (no padding), blocks are single tokens, one token is due and the store is full and
        stays so; the result is then the general path's, slot for slot (the tests check it). Returns whether it ran.
        """
        if not (self.block_size == 1 and self.rows_aligned and not self.has_fillers and self._new_tokens == 1):
            return False
        seen = torch.tensor([self.cumulative_length])
        sink = min(self.cumulative_length, self.sink)
        window = int(self.window_size(seen))
        if self.tail_length - sink - window != 1 or int(self.room(seen)) - window != self.store_length:
            return False
        tail, last = self.tail, self.tail_length - 1
        oldest = self.cumulative_length - self.tail_length + sink  # the first token id after the sink still in the tail
        where = (tail["token_ids"][:, :1] == oldest).int().argmax(-1, keepdim=True)  # [B, 1, 1]: its slot (the same in every head)
        leaving = {}
        for name, slots in tail.items():  # keys, values, token ids (and scores)
            if slots is not None:
                index = _slot_index(where, slots)
                leaving[name] = slots.gather(2, index)
                slots.scatter_(2, index, slots[:, :, last:])  # the last slot fills its place
        self.tail_length = last
        self.tail = _views(self.tail_buffers, last)
        self._admit(leaving)
        self.handed += 1
        self._tokens_until_check = 1
        return True


def _slot_index(per_head: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`per_head` ``[B, H or 1, 1]`` broadcast to index (or mask) one slot of `slots` ``[B, H, S, ...]`` per row and head."""
    shape = per_head.shape + (1,) * (slots.dim() - 3)
    return per_head.view(shape).expand(slots.shape[0], slots.shape[1], 1, *slots.shape[3:])


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

    def _admit(self, leaving: dict) -> None:
        """The token leaving the window replaces each head's lowest-scored heavy hitter, unless it scores no higher.

        Ties go as in `select_store`'s stable ranking: the newcomer first, then the latest of the lowest-scored.
        A store with no room for heavy hitters (a short prompt at a ratio, or recent_share=1) takes nothing.
        """
        store = self.store
        if store["scores"].shape[-1] == 0:
            return
        lowest = store["scores"].shape[-1] - 1 - store["scores"].flip(-1).argmin(-1, keepdim=True)  # [B, H, 1]
        replace = leaving["scores"] > store["scores"].gather(-1, lowest)
        for name in ("keys", "values", "token_ids", "scores"):
            slots, index = store[name], _slot_index(lowest, store[name])
            slots.scatter_(2, index, torch.where(_slot_index(replace, slots[..., :1]), leaving[name], slots.gather(2, index)))


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

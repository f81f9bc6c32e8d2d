"""Slots and the buffers that hold them: the storage layer of every compressed cache.

A part of a cache (its store or its tail) is a dict of buffers laid out ``[batch, heads or 1, slots, ...]``
with room for more slots than it holds. Attention is invariant to slot order, so layout is free: new
slots are written after the last one, and when slots leave, the last ones move into their gaps
(`place`), so per step only new and moved slots are copied. Gaps are *filler* slots (token id
`FILLER`) that kvcompress attention masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FILLER = -1
SYNTHESIZED = -2
STORE_ROOM = 32  # the store keeps room for 1/STORE_ROOM more slots
TAIL_ROOM = 32  # until tokens first leave it, a tail that outgrows its buffer gets room for a quarter more slots, up to this many
JOINT = ("keys", "values", "token_ids")  # what a plain store and the tail share one allocation for: all attention reads


@dataclass
class Slots:
    """A flat list of blocks of slots: the batch row of each block and, per KV head, its slots.

    Shapes: ``rows [n]``, ``keys``/``values [n, heads, k, head_dim]``, ``token_ids``/``scores``/
    ``bias``/``keep [n, heads, k]``. `token_ids` are real token indices (or `SYNTHESIZED`), `scores`
    the attention the slot has received so far (when the layer tracks it), `bias` an additive
    attention logit bias, `keep` which slots a per-head policy retains.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    token_ids: torch.Tensor
    scores: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def views(buffers: dict, length: int) -> dict:
    """The first `length` slots of each buffer (views: writing to them writes the buffer)."""
    return {name: None if buffer is None else buffer[:, :, :length] for name, buffer in buffers.items()}


def capacity(buffers: dict) -> int:
    return next(buffer.shape[2] for buffer in buffers.values() if buffer is not None)


def resized(buffers: dict, length: int, capacity: int) -> dict:
    """Buffers of `capacity` slots holding the first `length` slots of `buffers` (the same ones when they already fit exactly)."""
    return {name: None if buffer is None else resized_tensor(buffer, name, length, capacity) for name, buffer in buffers.items()}


def resized_tensor(buffer: torch.Tensor, name: str, length: int, capacity: int) -> torch.Tensor:
    if buffer.shape[2] == capacity:
        return buffer
    resized = filler_slots(buffer, name, capacity)
    resized[:, :, :length] = buffer[:, :, :length]
    return resized


def filler_slots(like: torch.Tensor, name: str, slots: int) -> torch.Tensor:
    """`slots` filler slots shaped like `like`: token id FILLER, zeros elsewhere (fillers must hold finite numbers: 0 x NaN is NaN)."""
    return like.new_full(like.shape[:2] + (slots,) + like.shape[3:], FILLER if name == "token_ids" else 0)


def joined(store: dict, store_length: int, store_capacity: int, tail: dict, tail_length: int, tail_capacity: int) -> tuple[dict, dict]:
    """Store and tail buffers of the given capacities whose `JOINT` tensors are the two halves of one allocation each."""
    joined_store, joined_tail = {}, {}
    for name in JOINT:
        joint = filler_slots(store[name], name, store_capacity + tail_capacity)
        joint[:, :, :store_length] = store[name][:, :, :store_length]
        joint[:, :, store_capacity : store_capacity + tail_length] = tail[name][:, :, :tail_length]
        joined_store[name], joined_tail[name] = joint[:, :, :store_capacity], joint[:, :, store_capacity:]
    others = lambda part, length, capacity: resized({name: t for name, t in part.items() if name not in JOINT}, length, capacity)  # noqa: E731
    return joined_store | others(store, store_length, store_capacity), joined_tail | others(tail, tail_length, tail_capacity)


def place(buffers: dict, length: int, keep: torch.Tensor, new: dict | None = None, keep_new: torch.Tensor | None = None) -> tuple[dict, int]:
    """Keep the `keep` slots (``[B, H, length]``) of the first `length` slots and add the `keep_new` slots of `new`, in place.

    The part becomes as long as the fullest (row, head) needs; kept slots inside that length stay
    where they are, and kept slots beyond it and the new ones move into the gaps, so only they are
    copied. Gaps left over become filler slots. A buffer with a head dimension of 1 is shared by all
    heads (its slots are aligned across heads, so every head keeps the same ones). Returns the
    buffers (grown when needed) and the new length.
    """
    batch, heads = keep.shape[:2]
    if new is None:
        keep_new = keep.new_zeros(batch, heads, 0)
    target = int((keep.sum(-1) + keep_new.sum(-1)).max()) if keep.numel() or keep_new.numel() else 0
    if target > capacity(buffers):
        buffers = resized(buffers, length, target)
    stay = min(length, target)
    hole = torch.ones(batch, heads, target, dtype=torch.bool, device=keep.device)
    hole[..., :stay] = ~keep[..., :stay]
    buffers["token_ids"][:, :, :target].masked_fill_(hole, FILLER)
    old_movers = keep & (torch.arange(length, device=keep.device) >= target)
    # The k-th mover of a (row, head), old ones first, goes to its k-th gap: no boolean indexing (each one a device sync).
    rank = torch.cat([old_movers, keep_new], dim=-1).cumsum(-1)
    destination = torch.searchsorted(hole.cumsum(-1), rank)  # first position with `rank` gaps up to it
    for source_movers, offset, source_of in ((old_movers, 0, lambda name: buffers[name]), (keep_new, length, lambda name: new[name])):
        moved = {}  # per head layout (1: shared by all heads): where movers are
        for name, buffer in buffers.items():
            if buffer is None or source_movers.shape[-1] == 0:
                continue
            shared = buffer.shape[1] == 1
            if shared not in moved:
                row, head, index = (source_movers[:, :1] if shared else source_movers).nonzero(as_tuple=True)
                moved[shared] = row, head, index, destination[row, head, index + offset]
            row, head, index, to = moved[shared]
            buffer[row, head, to] = source_of(name)[row, head, index]
    return buffers, target


def slot_index(per_head: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`per_head` ``[B, H or 1, 1]`` broadcast to index (or mask) one slot of `slots` ``[B, H, S, ...]`` per row and head."""
    shape = per_head.shape + (1,) * (slots.dim() - 3)
    return per_head.view(shape).expand(slots.shape[0], slots.shape[1], 1, *slots.shape[3:])

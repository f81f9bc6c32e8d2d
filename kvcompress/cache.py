"""The shared compressed-cache machinery every method builds on.

Per layer, batch row and KV head, a `CompressedLayer` holds two parts, and attention reads the
table ``[store | tail]`` they make:

* the *tail*: the row's first `sink` real tokens and its raw tokens that have not been handed to
  the method yet, exact and in order. It always holds at least the recent window.
* the *store*: whatever the method chose to keep for tokens that left the recent window (kept
  tokens, merged super-tokens, low-rank latents, ...), in the method's own encoding
  (`encode_store` / `decode_store`; by default plain keys and values). Only the encoded form is
  held between forward passes; decoded keys and values exist only while attention runs. A method
  whose encoding is cheaper to attend as it is than to decode (low-rank latents) says so with
  `attends_store`: attention then asks it for the partial softmax over its store
  (`attend_store`) and merges that with the exact tail (`attend_with_store`), and the store is
  never decoded.

Once a row's tail (sink excluded) is longer than its window by `block_size` tokens or more, the
oldest whole blocks are handed to the method (`compress_blocks`), which returns the slots to store
for them, or none. Rows and heads may end up with different slot counts (padding, per-head
eviction): the parts stay rectangular and the gaps are *filler* slots (token id -1) that the
kvcompress attention masks out. Attention is invariant to slot order, so layout is free, and the
core uses that freedom to work in place: both parts live in buffers with room for the slots they
reach, new tokens are written after the last slot, and when slots leave (handed to the method,
evicted) the last slots move into their gaps. Per step only the new and the moved slots are copied,
never the whole cache. A buffer grows when a part outgrows it; after each compression the tail's
is cut back to its tokens and room for the next block, and the store keeps room to grow by 1/32
(`STORE_ROOM`) so that it is reallocated once per ~3% of growth, not at every block. `nbytes()`
counts that room.

A plain store (keys and values as they are) shares one allocation with the tail: keys, values and
token ids are laid out ``[store with its room | tail]``, so attention reads the whole table as one
view, with the room's filler slots masked out, instead of joining the parts by a copy every step.

Everything is per row in the row's own real tokens (left padding is dropped), so a left-padded
batch compresses each row exactly as it would alone. Compression runs right after the layer's
attention (see `kvcompress.attention`), so prefill attention is exact and, with
`generate(prefill_chunk_size=...)`, prefill memory is bounded too.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import SCORES_PER_CHUNK, check_supported_config, expect_attention, merge_softmax, softmax_part

FILLER = -1
SYNTHESIZED = -2
STORE_ROOM = 32  # the store keeps room for 1/STORE_ROOM more slots
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


MAX_TOKENS = 2**40  # a token budget beyond any context a model can hold, and far inside int64


def _whole_number(name: str, value, what: str, low: int, high: int) -> int:
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
            object.__setattr__(self, "tokens", _whole_number("budget", self.tokens, "a positive number of tokens", 1, MAX_TOKENS))
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (numbers.Real, torch.Tensor)) or not math.isfinite(float(self.ratio)) or float(self.ratio) < 1:
                raise ValueError(f"ratio must be a finite compression ratio >= 1 (e.g. 8 for 8:1), got {self.ratio!r}.")
            object.__setattr__(self, "ratio", float(self.ratio))

    def at(self, seen: torch.Tensor) -> torch.Tensor:
        """Tokens a row may hold after seeing `seen` real tokens (per row)."""
        if self.tokens is not None:
            return torch.full_like(seen, self.tokens)
        return torch.ceil(seen / self.ratio).long()

    def check_sink(self, sink: int) -> None:
        if self.tokens is not None and sink >= self.tokens:
            raise ValueError(f"sink ({sink}) must be smaller than the budget ({self.tokens} tokens): the sink alone would fill it.")

    def __str__(self):
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.ratio:g}:1"


def _views(buffers: dict, length: int) -> dict:
    """The first `length` slots of each buffer (views: writing to them writes the buffer)."""
    return {name: None if buffer is None else buffer[:, :, :length] for name, buffer in buffers.items()}


def _capacity(buffers: dict) -> int:
    return next(buffer.shape[2] for buffer in buffers.values() if buffer is not None)


def _resized(buffers: dict, length: int, capacity: int) -> dict:
    """Buffers of `capacity` slots holding the first `length` slots of `buffers` (the same ones when they already fit exactly)."""
    return {name: None if buffer is None else _resized_tensor(buffer, name, length, capacity) for name, buffer in buffers.items()}


def _resized_tensor(buffer: torch.Tensor, name: str, length: int, capacity: int) -> torch.Tensor:
    if buffer.shape[2] == capacity:
        return buffer
    resized = _filler_slots(buffer, name, capacity)
    resized[:, :, :length] = buffer[:, :, :length]
    return resized


def _filler_slots(like: torch.Tensor, name: str, slots: int) -> torch.Tensor:
    """`slots` filler slots shaped like `like`: token id FILLER, zeros elsewhere (fillers must hold finite numbers: 0 x NaN is NaN)."""
    return like.new_full(like.shape[:2] + (slots,) + like.shape[3:], FILLER if name == "token_ids" else 0)


def _joined(store: dict, store_length: int, store_capacity: int, tail: dict, tail_length: int, tail_capacity: int) -> tuple[dict, dict]:
    """Store and tail buffers of the given capacities whose `JOINT` tensors are the two halves of one allocation each."""
    joined_store, joined_tail = {}, {}
    for name in JOINT:
        joint = _filler_slots(store[name], name, store_capacity + tail_capacity)
        joint[:, :, :store_length] = store[name][:, :, :store_length]
        joint[:, :, store_capacity : store_capacity + tail_length] = tail[name][:, :, :tail_length]
        joined_store[name], joined_tail[name] = joint[:, :, :store_capacity], joint[:, :, store_capacity:]
    others = lambda part, length, capacity: _resized({name: t for name, t in part.items() if name not in JOINT}, length, capacity)  # noqa: E731
    return joined_store | others(store, store_length, store_capacity), joined_tail | others(tail, tail_length, tail_capacity)


def _place(buffers: dict, length: int, keep: torch.Tensor, new: dict | None = None, keep_new: torch.Tensor | None = None) -> tuple[dict, int]:
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
    if target > _capacity(buffers):
        buffers = _resized(buffers, length, target)
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


class CompressedLayer(CacheLayerMixin):
    """One layer of a compressed cache: exact sink and recent window, method-defined store in between.

    Subclasses say what to keep for blocks leaving the window (`compress_blocks`), and may bound the
    store (`select_store`), size the window per row (`window_size`), ask for the attention each
    slot receives (`tracks_attention`) or hold the store in their own encoding (`encode_store`,
    `decode_store`).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    tracks_attention = False  # ask attention for the mass each slot receives (kept in `scores`)
    scores_store = False  # store slots keep a method-given score (`Slots.scores` from compress_blocks) without tracking attention
    uses_bias = False  # store slots carry an additive attention-logit bias (kept in `bias`)
    attends_store = False  # attention over the store is `attend_store`'s, in the store's own encoding: it is never decoded

    def __init__(self, layer_idx: int, sink: int = 4, window: int = 64, block_size: int = 1):
        super().__init__()
        for name, value, low in (("sink", sink, 0), ("window", window, 0), ("block_size", block_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        self.layer_idx = layer_idx
        self.sink, self.window, self.block_size = sink, window, block_size
        self._model_checked = False
        self.reset()

    # ----------------------------------------------------------------------------------- contract
    def compress_blocks(self, blocks: Slots) -> Slots | None:
        """Slots to store for whole blocks of `block_size` tokens leaving the window (None: store nothing)."""
        raise NotImplementedError

    def select_store(self, token_ids: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Optional bound on the store: which store slots ([B, H, S]) to keep after new ones arrived."""
        return None

    def window_size(self, seen: torch.Tensor) -> torch.Tensor:
        """Raw tokens (sink excluded) each row keeps exact, given the real tokens it has seen.

        Must not shrink as `seen` grows: compression checks are skipped until a block can be due.
        """
        return torch.full_like(seen, self.window)

    def encode_store(self, slots: dict) -> dict:
        """The form in which new store slots are held: by default their keys and values as they are.

        `slots` holds ``keys``/``values [B, H, n, D]``, ``token_ids [B, H, n]`` and, when the layer
        uses them, ``scores`` and ``bias``. The result must keep ``token_ids`` (and those two) and
        may hold any other tensors laid out ``[B, H or 1, n, ...]`` (1: shared by all heads).
        """
        return slots

    def decode_store(self, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, S, D]`` of the store for attention (transient: not kept)."""
        return store["keys"], store["values"]

    def attend_store(self, queries: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `attends_store` methods, whose store is cheaper to attend in its own encoding than to decode.

        Partial softmax of query rows ``[B, H, R, D]`` (each KV head's query heads times new tokens)
        over the store's filled slots, all of which every new token sees: ``(max logit [B, H, R], sum
        of weights [B, H, R], weighted values [B, H, R, D])`` in float32, each weight taken relative
        to the max, which must be finite (see `kvcompress.attention.merge_softmax`).
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- transformers contract
    def reset(self) -> None:
        self.store: dict = {}  # views of the first store_length slots of store_buffers (likewise for the tail)
        self.tail: dict = {}
        self.store_buffers: dict = {}
        self.tail_buffers: dict = {}
        self.store_length = self.tail_length = 0
        self.is_initialized = False
        self.cumulative_length = 0
        self.seen = self.handed = None
        self.has_fillers = False
        self.rows_aligned = True  # every row has seen the same real tokens (no padding): their tails hold the same token ids
        self._tokens_until_check = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = {
            "keys": key_states.new_empty(batch, heads, 0, head_dim),
            "values": value_states.new_empty(batch, heads, 0, value_states.shape[-1]),
            "token_ids": torch.empty(batch, heads, 0, dtype=torch.int32, device=self.device),
            "scores": torch.empty(batch, heads, 0, device=self.device) if self.tracks_attention else None,
        }
        self.tail_buffers = self.tail = dict(empty)
        store_extras = {"scores": self.tracks_attention or self.scores_store, "bias": self.uses_bias}
        self.store_buffers = self.store = self.encode_store(empty | {name: torch.empty(batch, heads, 0, device=self.device) if wanted else None for name, wanted in store_extras.items()})
        self.seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.handed = torch.zeros_like(self.seen)
        self.is_initialized = True
        self._arrange()

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens and return every slot for this forward's (exact) attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        tail = self.tail
        if key_states.shape[0] != tail["keys"].shape[0] or key_states.shape[1] != tail["keys"].shape[1] or key_states.shape[3] != tail["keys"].shape[3]:
            raise ValueError(
                f"Layer {self.layer_idx} holds batch/heads/head_dim {tuple(tail['keys'].shape[i] for i in (0, 1, 3))} but got "
                f"{tuple(key_states.shape[i] for i in (0, 1, 3))}; use a fresh cache (or cache.reset()) for a new batch."
            )
        batch, heads, new, _ = key_states.shape
        ids = (self.seen[:, None] + torch.arange(new, device=self.device)).to(torch.int32)
        length = self.tail_length
        if length + new > _capacity(self.tail_buffers):
            self._arrange(tail_capacity=length + new)
        appended = {"keys": key_states, "values": value_states, "token_ids": ids[:, None], "scores": 0.0}
        for name, buffer in self.tail_buffers.items():
            if buffer is not None:
                buffer[:, :, length : length + new] = appended[name]
        self.tail_length = length + new
        self.tail = tail = _views(self.tail_buffers, self.tail_length)
        self.cumulative_length += new
        self._new_tokens = new
        if self.plain_store:
            return self._joint_table("keys"), self._joint_table("values")
        if self.store_length == 0 or self.attends_store:  # attention reads the store through attend_with_store
            return tail["keys"], tail["values"]
        keys, values = self.decode_store(self.store)
        return torch.cat([keys, tail["keys"]], dim=-2), torch.cat([values, tail["values"]], dim=-2)

    @property
    def store_attended(self) -> bool:
        """Whether this forward's attention reads the store through `attend_with_store` (`update` returned only the tail)."""
        return self.attends_store and self.store_length > 0

    @property
    def plain_store(self) -> bool:
        """Whether the store holds keys and values as they are (and so shares the tail's allocation)."""
        return type(self).encode_store is CompressedLayer.encode_store and type(self).decode_store is CompressedLayer.decode_store

    def _joint_table(self, name: str) -> torch.Tensor:
        """The attention table ``[store with its room | tail]`` of a `JOINT` tensor: a view, no copy."""
        return self.store_buffers[name]._base[:, :, : self.table_store_width() + self.tail_length]

    def table_store_width(self) -> int:
        """Table slots before the tail's: the store's capacity when it shares the tail's allocation (its room is fillers), else its length."""
        return _capacity(self.store_buffers) if self.plain_store and self.is_initialized else self.store_length

    def tail_capacity(self) -> int:
        """Slots the tail's buffers hold: its tokens and room for the next block of new ones."""
        return _capacity(self.tail_buffers) if self.is_initialized else 0

    def store_capacity(self) -> int:
        """Slots the store's buffers hold: its slots and room to grow by 1/`STORE_ROOM`."""
        return _capacity(self.store_buffers) if self.is_initialized else 0

    def _arrange(self, tail_capacity: int | None = None) -> None:
        """Give the store room to grow by 1/`STORE_ROOM` (kept while it lasts) and the tail `tail_capacity` slots (default: its
        tokens and the next block); a plain store and the tail go into one allocation whenever either is reallocated."""
        store_length, room = self.store_length, self.store_length // STORE_ROOM
        store_capacity = _capacity(self.store_buffers)
        if not store_length + min(room, 1) <= store_capacity <= store_length + 2 * room:  # full, or far too big: reallocate
            store_capacity = store_length + room
        tail_capacity = self.tail_length + self.block_size if tail_capacity is None else tail_capacity
        if not self.plain_store:
            self.store_buffers = _resized(self.store_buffers, store_length, store_capacity)
            self.tail_buffers = _resized(self.tail_buffers, self.tail_length, tail_capacity)
        elif store_capacity != _capacity(self.store_buffers) or tail_capacity != _capacity(self.tail_buffers) or not self._is_joint():
            self.store_buffers, self.tail_buffers = _joined(self.store_buffers, store_length, store_capacity, self.tail_buffers, self.tail_length, tail_capacity)
        else:
            self.store_buffers["token_ids"][:, :, store_length:] = FILLER  # slots that just left the store
        self.store, self.tail = _views(self.store_buffers, store_length), _views(self.tail_buffers, self.tail_length)

    def _is_joint(self) -> bool:
        store, tail = self.store_buffers["keys"], self.tail_buffers["keys"]
        return store._base is not None and tail._base is store._base and tail.storage_offset() == store.storage_offset() + store.shape[2] * store.stride(2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.table_store_width() + self.tail_length
        return held + query_length, self.cumulative_length - held  # negative when fillers and room outnumber evicted tokens: only the new tokens' columns are read then

    def reorder_cache(self, beam_idx):
        raise NotImplementedError(
            "Beam search is not supported by kvcompress caches: beams would share compressed state that was "
            "built from different histories. Use greedy or sampling decoding (num_beams=1)."
        )

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError(
            "kvcompress caches cannot be cropped (assisted/speculative decoding): compressed slots cannot be "
            "rolled back token by token. Generate without an assistant model."
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def _map_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self.store_buffers = self.store = {name: None if t is None else fn(t) for name, t in self.store.items()}
        self.tail_buffers = self.tail = {name: None if t is None else fn(t) for name, t in self.tail.items()}
        self.seen, self.handed = fn(self.seen), fn(self.handed)
        self._arrange()

    # ------------------------------------------------------------------------ attention handshake
    def check_module(self, module, attention_kwargs: dict) -> None:
        """Refuse attention features this cache would silently ignore."""
        if not self._model_checked:
            check_supported_config(module.config)
            self._model_checked = True
        for feature in ("sliding_window", "softcap", "s_aux"):
            if attention_kwargs.get(feature) is not None:
                raise ValueError(f"Attention with {feature} is not supported by kvcompress caches.")

    def needs_slot_mask(self) -> bool:
        """Whether attention must use this layer's own slot mask rather than the positional one."""
        return self.has_fillers or self.uses_bias or self.tracks_attention or self.table_store_width() > self.store_length

    def table_token_ids(self) -> torch.Tensor:
        """Token id of every slot of the attention table ``[store | tail]`` ([B, H, slots]; -1: filler)."""
        if self.plain_store:
            return self._joint_table("token_ids")
        return torch.cat([self.store["token_ids"], self.tail["token_ids"]], dim=-1)

    def slot_filled(self, length: int) -> torch.Tensor:
        """Which of the first `length` table slots hold a token ([B, H, length])."""
        return self.table_token_ids()[..., :length] != FILLER

    def slot_bias(self, length: int) -> torch.Tensor | None:
        """Additive logit bias of the first `length` table slots (tail slots have none)."""
        if not self.uses_bias:
            return None
        bias = self.store["bias"]
        return torch.cat([bias, bias.new_zeros(*bias.shape[:2], length - bias.shape[2])], dim=-1)

    def attend_with_store(self, query: torch.Tensor, new_keep: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output ``[B, q, heads, D]`` of the new tokens' queries over the store (`attend_store`) and the exact tail.

        `new_keep` ``[B or 1, 1, q, q]`` says which new tokens each new query sees (causal, padding);
        every store slot precedes them all. Queries go in chunks so that at most `SCORES_PER_CHUNK`
        tail logits exist at once.
        """
        batch, heads, q_len, dim = query.shape
        keys, values = self.tail["keys"], self.tail["values"]
        kv_heads, length = keys.shape[1], keys.shape[2]
        groups = heads // kv_heads
        grouped = query.view(batch, kv_heads, groups, q_len, dim)
        filled = (self.tail["token_ids"] != FILLER)[:, :, None, None, : length - q_len]
        chunk = max(1, SCORES_PER_CHUNK // (batch * heads * length))
        outputs = []
        for start in range(0, q_len, chunk):
            size = min(chunk, q_len - start)
            rows = grouped[:, :, :, start : start + size].reshape(batch, kv_heads, groups * size, dim)
            keep = torch.cat([filled.expand(batch, kv_heads, 1, size, -1), new_keep[:, None, :, start : start + size].expand(batch, kv_heads, 1, size, q_len)], dim=-1)
            logits = (torch.matmul(rows, keys.transpose(-1, -2)).float() * scaling).view(batch, kv_heads, groups, size, length)
            logits = logits.masked_fill(~keep, float("-inf")).view(batch, kv_heads, groups * size, length)
            parts = [torch.stack(pair) for pair in zip(self.attend_store(rows, scaling), softmax_part(logits, values))]
            top, total, weighted = merge_softmax(*parts, dim=0)
            output = weighted / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
            outputs.append(output.view(batch, kv_heads, groups, size, dim))
        return torch.cat(outputs, dim=3).to(query.dtype).view(batch, heads, q_len, dim).transpose(1, 2)

    def after_attention(self, new_valid: torch.Tensor | None, received: torch.Tensor | None) -> None:
        """Record which new tokens were padding and the attention slots got, then compress."""
        new = self._new_tokens
        if new_valid is not None and not bool(new_valid.all()):
            self._check_left_padding(new_valid)
            ids = (self.seen[:, None] + new_valid.long().cumsum(-1) - 1).to(torch.int32)
            ids = ids.masked_fill(~new_valid, FILLER)
            self.tail["token_ids"][..., -new:] = ids[:, None]
            self.has_fillers = True
            self.rows_aligned = False
            self.seen += new_valid.sum(-1)
        else:
            self.seen += new
        if received is not None:
            width = self.table_store_width()
            self.store["scores"] += received[..., : self.store_length]
            self.tail["scores"] += received[..., width:]
        self._tokens_until_check -= new
        if self._tokens_until_check <= 0:
            self._compress()

    def _check_left_padding(self, new_valid: torch.Tensor) -> None:
        real_before_pad = (~new_valid[:, 1:] & new_valid[:, :-1]).any()
        pad_after_history = ((self.seen > 0) & (~new_valid).any(-1)).any()
        if bool(real_before_pad) or bool(pad_after_history):
            raise ValueError(
                "kvcompress caches support left padding only (padding before each row's first token). "
                "Set tokenizer.padding_side = 'left'."
            )

    # -------------------------------------------------------------------------------- compression
    def _compress(self) -> None:
        raw = self.seen - self.seen.clamp(max=self.sink) - self.handed  # handable tokens: not sink, not handed yet
        over = (raw - self.window_size(self.seen)).clamp(min=0)
        blocks = over // self.block_size
        hand = blocks * self.block_size
        # No row can hand off a block before this many more tokens arrive: windows never shrink as tokens arrive.
        self._tokens_until_check = int((self.block_size - over % self.block_size).min())
        if not bool((hand > 0).any()):
            return
        tail, length = self.tail, self.tail_length
        # Tail slots sorted by token id are each row's fillers, its sink, then its handable tokens oldest first.
        order = tail["token_ids"][:, 0].argsort(dim=-1, stable=True)
        first = length - raw
        method_slots = self._method_slots(tail, order, first, blocks)
        position = torch.arange(length, device=self.device)
        handed = (position >= first[:, None]) & (position < (first + hand)[:, None])
        handed = torch.zeros_like(handed).scatter_(1, order, handed)  # sorted positions -> slots
        self.tail_buffers, self.tail_length = _place(self.tail_buffers, length, (tail["token_ids"] != FILLER) & ~handed[:, None])

        store, stored = self.store, self.store_length
        new = None if method_slots is None else self.encode_store(method_slots)
        token_ids, scores = store["token_ids"], store.get("scores")
        if new is not None:
            token_ids = torch.cat([token_ids, new["token_ids"]], dim=2)
            scores = None if scores is None else torch.cat([scores, new["scores"]], dim=2)
        keep = token_ids != FILLER
        selected = self.select_store(token_ids, scores)
        if selected is not None:
            keep &= selected
        if new is not None or not bool(keep.all()):
            self.store_buffers, self.store_length = _place(self.store_buffers, stored, keep[..., :stored], new, keep[..., stored:])
        # The tail back to its tokens and room for the next block (a prefill left it longer); the store with room to grow.
        self._arrange()
        self.handed += hand
        self.has_fillers = bool((self.store["token_ids"] == FILLER).any() or (self.tail["token_ids"] == FILLER).any())

    def _method_slots(self, tail: dict, order: torch.Tensor, start: torch.Tensor, blocks: torch.Tensor) -> dict | None:
        """Hand each row's whole blocks to the method; lay what it returns out per row (gaps are fillers).

        `order` sorts each row's tail slots by token id; `start` is where, in that order, each row's handable tokens begin.
        """
        if not bool((blocks > 0).any()):
            return None
        rows = torch.repeat_interleave(torch.arange(len(blocks), device=self.device), blocks)
        block_in_row = torch.arange(len(rows), device=self.device) - torch.repeat_interleave(blocks.cumsum(0) - blocks, blocks)
        index = (start[rows] + block_in_row * self.block_size)[:, None] + torch.arange(self.block_size, device=self.device)
        index = order[rows[:, None], index]
        heads = tail["keys"].shape[1]
        where = (rows[:, None, None], torch.arange(heads, device=self.device)[None, :, None], index[:, None, :])

        def gather(tensor):  # [B, H, T, ...] -> [n, H, block_size, ...]
            return None if tensor is None else tensor[where]

        handed = Slots(rows, gather(tail["keys"]), gather(tail["values"]), gather(tail["token_ids"]), gather(tail["scores"]))
        out = self.compress_blocks(handed)
        if out is None or out.keys.shape[2] == 0:
            return None
        ids = out.token_ids if out.keep is None else out.token_ids.masked_fill(~out.keep, FILLER)
        if out.bias is not None and not self.uses_bias:
            raise RuntimeError(f"{type(self).__name__} returned slot biases but does not set uses_bias = True.")
        out = replace(out, token_ids=ids)
        # Row r's blocks go side by side: [B, H, max_blocks * k] with filler where a row has fewer blocks.
        per_block = out.keys.shape[2]
        width = int(blocks.max()) * per_block
        position = (block_in_row[:, None] * per_block + torch.arange(per_block, device=self.device))[:, None, :]
        batch = len(blocks)
        laid = {}
        wanted = {"scores": self.tracks_attention or self.scores_store, "bias": self.uses_bias}
        for name, value, fill in (("keys", out.keys, 0.0), ("values", out.values, 0.0), ("token_ids", out.token_ids, FILLER), ("scores", out.scores, 0.0), ("bias", out.bias, 0.0)):
            if not wanted.get(name, True):
                laid[name] = None
                continue
            if value is None:
                value = torch.zeros(len(rows), heads, per_block, device=self.device)
            shape = (batch, heads, width) + tuple(value.shape[3:])
            target = torch.full(shape, fill, dtype=value.dtype, device=self.device)
            target[where[0], where[1], position] = value
            laid[name] = target
        return laid

    # ------------------------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of memory this layer holds: every storage behind its tensors, counted once."""
        if not self.is_initialized:
            return 0
        storages = {}
        for part in (self.store, self.tail):
            for tensor in part.values():
                if tensor is not None:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def dense_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        keys, values = self.tail["keys"], self.tail["values"]
        batch, heads = keys.shape[:2]
        return batch * heads * self.cumulative_length * (keys.shape[-1] + values.shape[-1]) * keys.element_size()

    def tokens_held(self) -> torch.Tensor:
        """Filled slots per (row, head)."""
        return (self.table_token_ids() != FILLER).sum(-1)


class CompressedCache(Cache):
    """A `transformers.Cache` of `CompressedLayer`s: pass it to `model.generate(cache=...)` (`past_key_values=` before transformers 5.24).

    Subclasses set `layer_class` and pass its keyword arguments; layers are created on first use.
    """

    layer_class: type[CompressedLayer] = CompressedLayer

    def __init__(self, config=None, **layer_kwargs):
        if config is not None:
            check_supported_config(config)
        self._layer_kwargs = layer_kwargs
        self.layer_class(layer_idx=0, **layer_kwargs)  # validate the arguments now, not at the first update
        super().__init__(layer_class_to_replicate=self.layer_class)

    def layer(self, layer_idx: int) -> CompressedLayer:
        """The layer `layer_idx`, created (with those before it) on first use."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class(layer_idx=len(self.layers), **self._layer_kwargs))
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layer(layer_idx)
        keys, values = layer.update(key_states, value_states)
        expect_attention(layer, keys)
        return keys, values

    def nbytes(self) -> int:
        """Bytes this cache actually holds (keys, values and the per-slot bookkeeping)."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a `DynamicCache` would hold for the same tokens."""
        return sum(layer.dense_nbytes() for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        held = self.nbytes()
        return self.dense_nbytes() / held if held else 1.0

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self._layer_kwargs.items())})"


"""The engine every compressed cache runs on: buffers, scheduling, and the transformers and attention contracts.

Methods are policies (`kvcompress.policies`), not subclasses: a `KeepPolicy` chooses what to keep of
the tokens leaving the exact window, an `Encoding` decides how the kept slots are held. Per layer,
batch row and KV head, a `CompressedLayer` holds two parts, and attention reads the table
``[store | tail]`` they make:

* the *tail*: the row's first `sink` real tokens and its raw tokens that have not been handed to
  the policies yet, exact and in order. It always holds at least the recent window.
* the *store*: what the keep policy chose for tokens that left the recent window (kept tokens,
  merged super-tokens, low-rank latents, ...), in the encoding's form (`Encoding.encode` /
  `Encoding.decode`; by default plain keys and values). Only the encoded form is held between
  forward passes; decoded keys and values exist only while attention runs. An encoding that is
  cheaper to attend as it is than to decode (low-rank latents) says so with `attends_store`:
  attention then asks it for the partial softmax over its store (`Encoding.attend`) and merges
  that with the exact tail (`attend_with_store`), and the store is never decoded.

Once a row's tail (sink excluded) is longer than its window by `block_size` tokens or more, the
oldest whole blocks are handed to the policies (`KeepPolicy.choose`, then `Encoding.merge`), which
return the slots to store for them, or none; `KeepPolicy.bound` may then drop store slots. Rows and heads may end up with different slot counts (padding, per-head
eviction): the parts stay rectangular and the gaps are *filler* slots (token id -1) that the
kvcompress attention masks out. Attention is invariant to slot order, so layout is free, and the
core uses that freedom to work in place: both parts live in buffers with room for the slots they
reach, new tokens are written after the last slot, and when slots leave (handed to the policies,
evicted) the last slots move into their gaps. Per step only the new and the moved slots are copied,
never the whole cache. A buffer grows when a part outgrows it (the tail with room for 1/32 more and at least a block;
until tokens first leave it, a quarter more up to `TAIL_ROOM` slots, so that a tail nothing leaves yet is not
copied every few steps, nor a short prompt held in a buffer much longer than dense's); after each compression the tail's
is cut back to its tokens and room for the next block, and the store keeps room to grow by 1/32
(`STORE_ROOM`) so that it is reallocated once per ~3% of growth, not at every block. `nbytes()`
counts that room.

A plain store (keys and values as they are) shares one allocation with the tail: keys, values and
token ids are laid out ``[store with its room | tail]``, so attention reads the whole table as one
view, with the room's filler slots masked out, instead of joining the parts by a copy every step.

Everything is per row in the row's own real tokens (left padding is dropped), so a left-padded
batch compresses each row exactly as it would alone. Compression runs right after the layer's
attention (see `kvcompress.attention`), so prefill attention is exact and, with
`generate(prefill_chunk_size=...)`, prefill memory is bounded too. A budgeted keep policy's usual
step (one token leaves; the store stays full, or takes the slot its budget gained) runs in place
without a device sync, on a GPU in one kernel (`_hand_one_in_place`, `kvcompress.token_step`). So do the
blocks of a cache that stores every token as it is (low rank, quantized) in rows without padding
(`_hand_blocks_in_place`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import tail_attention, token_step
from .attention import SCORES_PER_CHUNK, check_supported_config, expect_attention, window_hides_tokens
from .parallel import rank_heads
from .policies import Encoding, KeepPolicy
from .settings import CacheSettings
from .slots import FILLER, STORE_ROOM, TAIL_ROOM, Slots, capacity, joined, place, resized, slot_index, views
from .softmax import attend_with_part

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class CompressedLayer(CacheLayerMixin):
    """One layer of a compressed cache: exact sink and recent window, and a store whose content the
    cache's `KeepPolicy` chooses and whose form its `Encoding` decides (`kvcompress.policies`).

    This class is the engine (buffers, scheduling, the transformers and attention contracts); methods are
    policies, not subclasses. Attention reads a layer through `kvcompress.attention.AttentionLayer`.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, keep: KeepPolicy | None = None, encoding: Encoding | None = None, settings: CacheSettings | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.keep = keep or KeepPolicy()
        self.encoding = encoding or Encoding()
        self.settings = settings or CacheSettings()
        self.artifacts = (*self.keep.artifacts, *self.encoding.artifacts)
        # What the policies declare, read once: the engine and attention consult it on every step.
        self.tracks_attention = self.keep.needs_attention
        self.store_scores = self.keep.needs_attention or self.keep.keeps_scores  # store slots keep received attention or the policy's score
        self.uses_bias, self.attends_store = self.encoding.uses_bias, self.encoding.attends_store
        self.plain_store = self.encoding.plain  # keys and values as they are: the store shares the tail's allocation
        # Every token leaving the window is stored as it is (`KeepPolicy`'s own window, choice and bound, `Encoding`'s own
        # merge; a store apart from the tail): the low-rank caches and quantized ones without gates (`_hand_blocks_in_place`).
        self.stores_every_token = (
            self.keep.budget is None and not self.plain_store and not self.tracks_attention and type(self.encoding).merge is Encoding.merge
            and all(getattr(type(self.keep), name) is getattr(KeepPolicy, name) for name in ("window", "choose", "bound"))
        )
        self.sink, self.block_size = self.settings.sink, self.settings.block_size
        self._model_checked = False
        self.reset()

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
        self.has_handed = False  # tokens have left the tail: it holds a window, with room for a block (or 1/32) only

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
        store_extras = {"scores": self.store_scores, "bias": self.uses_bias}
        for artifact in self.artifacts:
            artifact.check_shapes(self.layer_idx, key_states, value_states)
        self.store_buffers = self.store = self.encoding.encode(self, empty | {name: torch.empty(batch, heads, 0, device=self.device) if wanted else None for name, wanted in store_extras.items()})
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
        ids = self.seen[:, None] if new == 1 else self.seen[:, None] + torch.arange(new, device=self.device)  # written as int32 by the copy
        length = self.tail_length
        if length + new > capacity(self.tail_buffers):  # room to grow: a tail that nothing leaves yet is not copied every step
            grown = length + new
            room = max(self.block_size, grown // STORE_ROOM) if self.has_handed else max(grown // STORE_ROOM, min(TAIL_ROOM, grown // 4))
            self._arrange(tail_capacity=grown + room)
        appended = {"keys": key_states, "values": value_states, "token_ids": ids[:, None], "scores": 0.0}
        for name, buffer in self.tail_buffers.items():
            if buffer is not None:
                buffer[:, :, length : length + new] = appended[name]
        self.tail_length = length + new
        self.tail = tail = views(self.tail_buffers, self.tail_length)
        self.cumulative_length += new
        self._new_tokens = new
        if self.plain_store:
            return self._joint_table("keys"), self._joint_table("values")
        if self.store_length == 0 or self.attends_store:  # attention reads the store through attend_with_store
            return tail["keys"], tail["values"]
        keys, values = self.encoding.decode(self, self.store)
        return torch.cat([keys, tail["keys"]], dim=-2), torch.cat([values, tail["values"]], dim=-2)

    @property
    def store_attended(self) -> bool:
        """Whether this forward's attention reads the store through `attend_with_store` (`update` returned only the tail)."""
        return self.attends_store and self.store_length > 0

    def _joint_table(self, name: str) -> torch.Tensor:
        """The attention table ``[store with its room | tail]`` of a `JOINT` tensor: a view, no copy."""
        return self.store_buffers[name]._base[:, :, : self.table_store_width() + self.tail_length]

    def table_store_width(self) -> int:
        """Table slots before the tail's: the store's capacity when it shares the tail's allocation (its room is fillers), else its length."""
        return capacity(self.store_buffers) if self.plain_store and self.is_initialized else self.store_length

    def tail_capacity(self) -> int:
        """Slots the tail's buffers hold: its tokens and room for the next block of new ones."""
        return capacity(self.tail_buffers) if self.is_initialized else 0

    def store_capacity(self) -> int:
        """Slots the store's buffers hold: its slots and room to grow by 1/`STORE_ROOM`."""
        return capacity(self.store_buffers) if self.is_initialized else 0

    def _arrange(self, tail_capacity: int | None = None) -> None:
        """Give the store room to grow by 1/`STORE_ROOM` (kept while it lasts) and the tail `tail_capacity` slots (default: its
        tokens and the next block); a plain store and the tail go into one allocation whenever either is reallocated."""
        store_length, store_capacity = self.store_length, capacity(self.store_buffers)
        if not self._store_room_holds(store_length):  # full, or far too big: reallocate
            store_capacity = store_length + store_length // STORE_ROOM
        tail_capacity = self.tail_length + self.block_size if tail_capacity is None else tail_capacity
        if not self.plain_store:
            self.store_buffers = resized(self.store_buffers, store_length, store_capacity)
            self.tail_buffers = resized(self.tail_buffers, self.tail_length, tail_capacity)
        elif store_capacity != capacity(self.store_buffers) or tail_capacity != capacity(self.tail_buffers) or not self._is_joint():
            self.store_buffers, self.tail_buffers = joined(self.store_buffers, store_length, store_capacity, self.tail_buffers, self.tail_length, tail_capacity)
        else:
            self.store_buffers["token_ids"][:, :, store_length:] = FILLER  # slots that just left the store
        self.store, self.tail = views(self.store_buffers, store_length), views(self.tail_buffers, self.tail_length)

    def _store_room_holds(self, length: int) -> bool:
        """Whether the store's buffers hold `length` slots and room to grow, and not far more room (`_arrange` keeps them then)."""
        room = length // STORE_ROOM
        return length + min(room, 1) <= capacity(self.store_buffers) <= length + 2 * room

    def _is_joint(self) -> bool:
        store, tail = self.store_buffers["keys"], self.tail_buffers["keys"]
        return store._base is not None and tail._base is store._base and tail.storage_offset() == store.storage_offset() + store.shape[2] * store.stride(2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # transformers' contract (an abstract method of CacheLayerMixin): no fixed maximum

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 0 and self.cumulative_length:  # generate() cut away every input token the cache had seen: none was left
            raise ValueError(
                f"The input brings no token beyond the {self.cumulative_length} this cache already holds: a cache holds one conversation. "
                "To continue it, give the whole conversation so far and the new turn; for another prompt, pass a new cache or call cache.reset()."
            )
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
            for artifact in self.artifacts:
                artifact.check_module(module)
            self._model_checked = True
        if window_hides_tokens(attention_kwargs.get("sliding_window"), module.config):
            raise ValueError("Attention with sliding_window is not supported by kvcompress caches.")
        for feature in ("softcap", "s_aux"):
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
        if q_len == 1 and tail_attention.available(query):  # a decode step on a GPU: the tail and the merge in one kernel
            rows = grouped[:, :, :, 0]
            store = self.encoding.attend(self, self.store, rows, scaling)
            output = tail_attention.attend_tail(rows, keys, values, self.tail["token_ids"], new_keep.reshape(-1), store, scaling)
            return output.view(batch, heads, 1, dim).transpose(1, 2)
        filled = (self.tail["token_ids"] != FILLER)[:, :, None, None, : length - q_len]
        chunk = max(1, SCORES_PER_CHUNK // (batch * heads * length))
        outputs = []
        for start in range(0, q_len, chunk):
            size = min(chunk, q_len - start)
            rows = grouped[:, :, :, start : start + size].reshape(batch, kv_heads, groups * size, dim)
            keep = torch.cat([filled.expand(batch, kv_heads, 1, size, -1), new_keep[:, None, :, start : start + size].expand(batch, kv_heads, 1, size, q_len)], dim=-1)
            logits = (torch.matmul(rows, keys.transpose(-1, -2)).float() * scaling).view(batch, kv_heads, groups, size, length)
            logits = logits.masked_fill(~keep, float("-inf")).view(batch, kv_heads, groups * size, length)
            output = attend_with_part(self.encoding.attend(self, self.store, rows, scaling), logits, values)
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
        if self.keep.budget is not None and self._hand_one_in_place():
            return
        if self.stores_every_token and self._hand_blocks_in_place():
            return
        raw = self.seen - self.seen.clamp(max=self.sink) - self.handed  # handable tokens: not sink, not handed yet
        past_window = raw - self.keep.window(self, self.seen)  # negative while the window is not full
        blocks = past_window.clamp(min=0) // self.block_size
        hand = blocks * self.block_size
        # No row can hand off a block before this many more tokens arrive (each adds at most one handable token, and
        # windows never shrink as tokens arrive): a row left `past_window - hand` tokens past its window needs the rest of a block.
        self._tokens_until_check = int((self.block_size - (past_window - hand)).min())
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
        self.tail_buffers, self.tail_length = place(self.tail_buffers, length, (tail["token_ids"] != FILLER) & ~handed[:, None])

        store, stored = self.store, self.store_length
        new = None if method_slots is None else self.encoding.encode(self, method_slots)
        token_ids, scores = store["token_ids"], store.get("scores")
        if new is not None:
            token_ids = torch.cat([token_ids, new["token_ids"]], dim=2)
            scores = None if scores is None else torch.cat([scores, new["scores"]], dim=2)
        keep = token_ids != FILLER
        selected = self.keep.bound(self, token_ids, scores)
        if selected is not None:
            keep &= selected
        if new is not None or not bool(keep.all()):
            self.store_buffers, self.store_length = place(self.store_buffers, stored, keep[..., :stored], new, keep[..., stored:])
        # The tail back to its tokens and room for the next block (a prefill left it longer); the store with room to grow.
        self._arrange()
        self.handed += hand
        self.has_handed = True
        self.has_fillers = bool((self.store["token_ids"] == FILLER).any() or (self.tail["token_ids"] == FILLER).any())

    def _hand_blocks_in_place(self) -> bool:
        """The whole blocks due, stored without a device sync (the general path has some ten per block, `place`'s `nonzero` among
        them): in aligned rows without fillers every count is the same in every row and known here, so the oldest tokens past
        the window are found by a sort of the tail's token ids, encoded and written after the store's slots, and the tail's
        newest slots move into the gaps they leave, as `place` moves them. The result is the general path's, slot for slot
        (the tests check it). Returns whether it ran.
        """
        if not (self.rows_aligned and not self.has_fillers):
            return False
        length, sink = self.tail_length, min(self.cumulative_length, self.sink)
        past_window = length - sink - self.settings.window
        hand = max(past_window, 0) // self.block_size * self.block_size
        self._tokens_until_check = self.block_size - (past_window - hand)
        if hand == 0:
            return True
        order = self.tail["token_ids"][:, 0].argsort(dim=-1, stable=True)  # [B, length]; every head holds the same tokens
        leaving = order[:, sink : sink + hand]
        gaps = torch.zeros_like(order, dtype=torch.bool).scatter_(1, leaving, True)
        staying, position = length - hand, torch.arange(length, device=self.device)
        movers = (gaps | (position < staying)).int().argsort(dim=-1, stable=True)  # the slots past `staying` that stay, first
        gap_rank = gaps[:, :staying].cumsum(-1) - 1
        source = torch.where(gaps[:, :staying], movers.gather(1, gap_rank.clamp(min=0)), position[:staying])  # the k-th gap takes the k-th mover
        gathered = lambda slots, index: slots.take_along_dim(index.view(index.shape[0], 1, -1, *(1,) * (slots.dim() - 3)), dim=2)  # noqa: E731
        new = self.encoding.encode(self, {name: None if slots is None else gathered(slots, leaving) for name, slots in self.tail.items()} | {"bias": None})
        stored = self.store_length
        if stored + hand > capacity(self.store_buffers):
            self.store_buffers = resized(self.store_buffers, stored, stored + hand)
        for name, buffer in self.store_buffers.items():
            if buffer is not None:
                buffer[:, :, stored : stored + hand] = new[name]
        for buffer in self.tail_buffers.values():
            if buffer is not None:
                buffer[:, :, :staying] = gathered(buffer[:, :, :length], source)
        self.store_length, self.tail_length = stored + hand, staying
        self._arrange()
        self.handed += hand
        self.has_handed = True
        return True

    def _hand_one_in_place(self) -> bool:
        """The usual per-token step without a device sync, in one kernel on a GPU (`kvcompress.token_step`) and a few dozen
        small operations elsewhere: the oldest token leaves the window, its slot is filled by the tail's last one, and
        the keep policy's `admit` decides what the store keeps.

        Only when rows are aligned (no padding), blocks are single tokens, one token is due (or none: the window grew)
        and the store is full and stays so, or grows by one slot within its room (a ratio's budget gains a token in
        `ratio`; policies with `admits_when_growing`); the result is then the general path's, slot for slot (the
        tests check it), except that the tail keeps the room a growing window gave it (at most 1/32 of it) where the
        general path would copy it back to its length. Returns whether it ran.
        """
        if not (self.block_size == 1 and self.rows_aligned and not self.has_fillers and self._new_tokens == 1):
            return False
        seen = torch.tensor([self.cumulative_length])
        sink = min(self.cumulative_length, self.sink)
        window = int(self.keep.window(self, seen))
        if self.tail_length - sink == window:  # the window grew: nothing leaves (the general path's count, with no sync)
            self._tokens_until_check = 1
            return True
        grows = int(self.keep.budget.room(seen, self.settings)) - window - self.store_length  # 1: the store takes one more slot
        if self.tail_length - sink - window != 1 or not (grows == 0 or (grows == 1 and self.keep.admits_when_growing and self._store_room_holds(self.store_length + 1))):
            return False
        tail, last = self.tail, self.tail_length - 1
        oldest = self.cumulative_length - self.tail_length + sink  # the first token id after the sink still in the tail
        if grows:  # a last slot for `admit` to fill: a filler that any score beats
            self.store_length += 1
            self.store = views(self.store_buffers, self.store_length)
            self.store["scores"][:, :, -1] = float("-inf")
        if token_step.available(tail["keys"]):  # one kernel on a GPU, not some 25 small ones (60 with H2O's admission)
            admit_in_kernel = self.keep.replaces_lowest_scored and self.store_length > 0
            leaving = token_step.hand_one(tail, last, oldest, admit_into=self.store if admit_in_kernel else None)
        else:
            admit_in_kernel = False
            where = (tail["token_ids"][:, :1] == oldest).int().argmax(-1, keepdim=True)  # [B, 1, 1]: its slot (the same in every head)
            leaving = {}
            for name, slots in tail.items():  # keys, values, token ids (and scores)
                if slots is not None:
                    index = slot_index(where, slots)
                    leaving[name] = slots.gather(2, index)
                    slots.scatter_(2, index, slots[:, :, last:].clone())  # the last slot fills its place (a copy: it may be that place)
        self.tail_length = last
        self.tail = views(self.tail_buffers, last)
        if not admit_in_kernel:
            self.keep.admit(self, leaving)
        self.handed += 1
        if not self.has_handed:  # the first token left: the room a growing tail got is not kept
            self.has_handed = True
            self._arrange()
        self._tokens_until_check = 1
        return True

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
        out = self.keep.choose(self, handed)
        if out is not None:
            out = self.encoding.merge(self, out)
        if out is None or out.keys.shape[2] == 0:
            return None
        ids = out.token_ids if out.keep is None else out.token_ids.masked_fill(~out.keep, FILLER)
        if out.bias is not None and not self.uses_bias:
            raise RuntimeError(f"{type(self.encoding).__name__} returned slot biases but does not set uses_bias = True.")
        out = replace(out, token_ids=ids)
        # Row r's blocks go side by side: [B, H, max_blocks * k] with filler where a row has fewer blocks.
        per_block = out.keys.shape[2]
        width = int(blocks.max()) * per_block
        position = (block_in_row[:, None] * per_block + torch.arange(per_block, device=self.device))[:, None, :]
        batch = len(blocks)
        laid = {}
        wanted = {"scores": self.store_scores, "bias": self.uses_bias}
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
        for tensor in (*self.store.values(), *self.tail.values(), self.seen, self.handed):  # the per-row counters too
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
    """The general compressed cache: a `transformers.Cache` whose layers keep what `keep` chooses, held as `encoding` says.

    ``CompressedCache(keep=MyPolicy(), sink=4, window=64, block_size=16)``; pass it to ``model.generate(cache=...)``
    (``past_key_values=`` before transformers 5.24). The public caches are presets of it. Settings resolve in one
    place (`CacheSettings.resolve`): the defaults, then the keep policy's preferences, then `fitted` (the settings an
    artifact was fitted with), then what is passed here. Layers are created on first use.
    """

    def __init__(
        self, keep: KeepPolicy | None = None, encoding: Encoding | None = None, *, sink: int | None = None, window: int | None = None,
        block_size: int | None = None, fitted: dict | None = None, config: PretrainedConfig | None = None,
    ) -> None:
        if config is not None:
            check_supported_config(config)
        self.keep = keep or KeepPolicy()
        self.encoding = encoding or Encoding()
        for name, policy, kind in (("keep", self.keep, KeepPolicy), ("encoding", self.encoding, Encoding)):
            if isinstance(policy, type) and issubclass(policy, kind):
                raise TypeError(f"{name}= takes an instance of a policy, not the class: {name}={policy.__name__}().")
            if not isinstance(policy, kind):
                raise TypeError(f"{name}= takes a kvcompress.policies.{kind.__name__} instance, got {type(policy).__name__}.")
        self.settings = CacheSettings.resolve(self.keep.preferred, fitted, sink=sink, window=window, block_size=block_size)
        if self.keep.budget is not None:
            self.keep.budget.check(self.settings)
        super().__init__(layer_class_to_replicate=CompressedLayer)

    def layer(self, layer_idx: int) -> CompressedLayer:
        """The layer `layer_idx`, created (with those before it) on first use."""
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(len(self.layers), self.keep, self.encoding, self.settings))
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not self.layers:
            self._serve_heads(key_states.shape[1])
        layer = self.layer(layer_idx)
        keys, values = layer.update(key_states, value_states)
        expect_attention(layer, keys)
        return keys, values

    def _serve_heads(self, heads: int) -> None:
        """Before the first layer: a model that shows this process `heads` of the KV heads its artifacts were fitted for is
        tensor parallel (`kvcompress.parallel`), and the policies serve this rank's heads. Otherwise the artifacts' shape
        check refuses the model at the first update."""
        fitted = {artifact.config["base_model"]["num_kv_heads"] for artifact in (*self.keep.artifacts, *self.encoding.artifacts)}
        served = rank_heads(heads, fitted.pop()) if len(fitted) == 1 else None
        if served is not None:
            self.keep, self.encoding = self.keep.for_heads(served), self.encoding.for_heads(served)

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
        sized_by_budget = {"window"} if self.keep.budget is not None else set()  # the budget sets the window as tokens arrive
        settings = ", ".join(f"{name}={value}" for name, value in vars(self.settings).items() if name not in sized_by_budget)
        return f"{type(self).__name__}({self.keep!r}, {self.encoding!r}, {settings})"


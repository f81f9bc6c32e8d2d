"""The policy interface: a compressed cache is the engine (`kvcompress.cache`) plus two small policies.

* A `KeepPolicy` decides *what to keep* of the tokens that leave the exact recent window: nothing
  (StreamingLLM), the tokens that received the most attention (H2O), the tokens learned gates mark
  (GatedCache), or everything (the low-rank and merging caches).
* An `Encoding` decides *how the kept tokens are held*: as they are, as low-rank latents, quantized,
  or merged into fewer synthesized slots.

What a policy needs from the engine it declares with class attributes (`needs_attention`,
`keeps_scores`, `per_head`, `plain`, `attends_store`, `uses_bias`); the engine reads them, never the
policy's methods. Policies see a layer only through `LayerView` (read-only), so a new method is a
file of a few dozen lines that touches no engine state: see `docs/writing-a-method.md`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .slots import Slots

if TYPE_CHECKING:
    from .hub import CompressorArtifact
    from .settings import Budget, CacheSettings


class LayerView(Protocol):
    """What a policy may read of the cache layer it serves."""

    layer_idx: int
    settings: CacheSettings
    seen: torch.Tensor  # real tokens each row has seen so far ([B])
    store: dict  # the store's slots as the encoding holds them (``token_ids`` [B, H, S], ...)
    dtype: torch.dtype


class KeepPolicy:
    """What to keep of the tokens leaving the recent window. The default keeps every one.

    Override `choose` (mark the slots to keep in ``Slots.keep``, or give them ``Slots.scores``) and,
    to bound the store afterwards, `bound`. A policy is shared by every layer of one cache.
    """

    needs_attention = False  # the engine adds the attention each slot receives to its score (``Slots.scores``)
    keeps_scores = False  # the store keeps the per-slot scores that `choose` returns (for `bound`)
    per_head = True  # heads may keep different tokens (False: every head of a layer keeps the same ones)
    budget: Budget | None = None  # a token budget per row and head, which sizes the window (`window`)
    admits_when_growing = False  # `admit` fills a slot the store gains as a ratio's budget grows (else such steps take the general path)
    replaces_lowest_scored = False  # `admit` puts the token in place of the store's lowest-scored slot if it scores higher (H2O): on a GPU the step's kernel does it
    preferred: dict = {}  # settings this policy works best with (e.g. block_size=1), below the artifact's and the user's
    artifacts: tuple[CompressorArtifact, ...] = ()  # fitted artifacts, checked against the model at first use

    def window(self, layer: LayerView, seen: torch.Tensor) -> torch.Tensor:
        """Tokens (sink excluded) each row keeps exact after seeing `seen` real tokens; must not shrink as `seen` grows."""
        return torch.full_like(seen, layer.settings.window)

    def choose(self, layer: LayerView, blocks: Slots) -> Slots | None:
        """The slots to store for whole blocks leaving the window (None: store nothing)."""
        return blocks

    def bound(self, layer: LayerView, token_ids: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Which store slots (``[B, H, S]``, old and new) to keep once new ones arrived; None keeps them all."""
        return None

    def for_heads(self, heads: range) -> KeepPolicy:
        """This policy serving only the KV heads `heads` (one rank's under tensor parallelism, `kvcompress.parallel`)."""
        return _without_artifacts(self)

    def __repr__(self):
        return type(self).__name__

    def admit(self, layer: LayerView, leaving: dict) -> None:
        """For a budgeted policy with single-token blocks whose full store stays full: let the store take the token
        leaving the window (one slot ``[B, H, 1, ...]`` per tail tensor) in place of one of its own, by writing
        into ``layer.store``. With `admits_when_growing`, also when the budget grows by a slot: the store's last slot is
        then a filler scored -inf, which the policy must fill. By default it takes nothing."""


class Encoding:
    """How stored slots are held. The default holds keys and values as they are.

    Override `merge` to turn the kept blocks into other (fewer, synthesized) slots, `encode`/`decode` to hold
    them in another form, and `attend` (with ``attends_store = True``) when attention is cheaper over that
    form than over decoded keys and values.
    """

    plain = True  # the store holds ``keys`` and ``values`` as they are (it then shares one allocation with the tail)
    attends_store = False  # attention over the store is `attend`'s, in the encoded form: it is never decoded
    uses_bias = False  # slots carry an additive attention-logit bias (``Slots.bias``)
    artifacts: tuple[CompressorArtifact, ...] = ()

    def for_heads(self, heads: range) -> Encoding:
        """This encoding serving only the KV heads `heads` (one rank's under tensor parallelism, `kvcompress.parallel`)."""
        return _without_artifacts(self)

    def widths(self, layer_idx: int, head_dim: int) -> list[tuple[int, int]]:
        """The numbers held per stored slot, for the byte model (`kvcompress.memory`): per tensor, its width and how many heads
        share it (a key and a value of `head_dim` numbers per head by default)."""
        return [(head_dim, 1), (head_dim, 1)]

    def slot_bytes(self, layer_idx: int, head_dim: int, dtype_bytes: int) -> float:
        """Bytes of numbers per stored token-head (bookkeeping such as token ids excluded)."""
        return sum(width * dtype_bytes / heads for width, heads in self.widths(layer_idx, head_dim))

    def merge(self, layer: LayerView, blocks: Slots) -> Slots:
        """The slots to store for the kept blocks: by default the blocks themselves."""
        return blocks

    def encode(self, layer: LayerView, slots: dict) -> dict:
        """The held form of new store slots (``keys``/``values [B, H, n, D]``, ``token_ids [B, H, n]``, and ``scores`` /
        ``bias`` when used). Must keep ``token_ids`` (and those two); other tensors are laid out ``[B, H or 1, n, ...]``."""
        return slots

    def decode(self, layer: LayerView, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, S, D]`` of the store for attention (transient: not kept)."""
        return store["keys"], store["values"]

    def attend(self, layer: LayerView, store: dict, queries: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``attends_store``: the partial softmax of query rows ``[B, H, R, D]`` over the `store`'s filled slots, all of which
        every new token sees: ``(max logit [B, H, R], sum of weights [B, H, R], weighted values [B, H, R, D])`` in float32, the
        weights taken relative to the max, which must be finite (see `kvcompress.softmax.merge_softmax`)."""
        raise NotImplementedError(f"{type(self).__name__} sets attends_store but does not implement attend().")

    def __repr__(self):
        return type(self).__name__


def _without_artifacts(policy):
    """A policy without per-head artifacts serves any heads as it is; one with them must slice them (`for_heads`)."""
    if policy.artifacts:
        raise NotImplementedError(f"{type(policy).__name__} holds per-head artifacts but does not say how to serve some of the heads (for_heads).")
    return policy

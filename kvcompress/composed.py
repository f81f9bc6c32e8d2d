"""Eviction x low rank x quantization in one cache.

The three ways to shrink a KV cache multiply: learned gates decide *which* tokens leaving the recent
window are kept (`GatedCache`), a per-head low-rank projection decides *how many numbers* each kept
token needs (`PCACache` / `KVSpliceCache`), and integer quantization decides *how many bits* each
number gets. `ComposedCache` stacks any of them over the shared core: the gate chooses the slots,
the projection encodes them into latents, and the latents (or the plain keys and values, without a
projection) are stored as int8 or int4 with a float16 scale per group. The sink and the recent
window stay exact. With a projection, attention reads the stored latents as they are (the low-rank
caches' `attend_store`; the Triton kernel de-quantizes them on chip); without one, the keys and
values are de-quantized while a layer's attention runs.

Each part is the method's own code (`GatedLayer.compress_blocks`, `LowRankCompressor.encode` and
`attend_store`, `kvcompress.quantize`); this file only wires them together.
"""

from __future__ import annotations

import torch

from .cache import CompressedCache, Slots
from .gate import GateCompressor, GatedLayer, gating
from .hub import FittedLayer
from .lowrank import LowRankCompressor
from .quantize import Quantized, check_quantization, quantize


class ComposedLayer(FittedLayer):
    """Gate (optional) chooses the stored tokens; projection (optional) and quantization (optional) encode them."""

    def __init__(
        self, layer_idx: int, gate: dict | None, lowrank: LowRankCompressor | None, bits: int | None, group_size: int,
        sink: int = 4, window: int = 64, block_size: int = 16,
    ):
        check_quantization(bits, group_size)
        super().__init__(layer_idx, lowrank, sink=sink, window=window, block_size=block_size)
        self.gating = GatedLayer(layer_idx, **gate, sink=sink, window=window, block_size=block_size) if gate else None
        self.lowrank, self.bits, self.group_size = lowrank, bits, group_size
        if self.gating is not None:
            self.artifacts.append(self.gating.compressor)
        self.scores_store = self.gating is not None  # gate probabilities, for the hard cap
        # Per-head gating leaves each head its own slots; latents shared across heads need aligned slots.
        self.per_head_latents = self.gating is not None and self.gating.policy == "head"
        self.widths: dict[str, int] = {}

    @property
    def attends_store(self) -> bool:
        return self.lowrank is not None  # attention reads the latents as they are, not decoded keys and values

    def compress_blocks(self, blocks: Slots) -> Slots:
        return blocks if self.gating is None else self.gating.compress_blocks(blocks)

    def select_store(self, token_ids: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.gating is None else self.gating.select_store(token_ids, scores)

    def encode_store(self, slots: dict) -> dict:
        tensors = {"keys": slots["keys"], "values": slots["values"]}
        if self.lowrank is not None:
            tensors = self.lowrank.encode(self.layer_idx, slots["keys"], slots["values"], slots["token_ids"], per_head=self.per_head_latents)
        if self.bits is not None:
            self.widths = {name: tensor.shape[-1] for name, tensor in tensors.items()}
            tensors = {f"{name}.{part}": packed for name, tensor in tensors.items() for part, packed in quantize(tensor, self.bits, self.group_size).items()}
        return {name: slots[name] for name in ("token_ids", "scores", "bias") if name in slots} | tensors

    def decode_store(self, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = [t.dequantize(self.dtype) if isinstance(t, Quantized) else t for t in self._stored(store)]
        if self.lowrank is not None:
            return self.lowrank.decode(self.layer_idx, *tensors, store["token_ids"])
        return tensors[0], tensors[1]

    def attend_store(self, queries: torch.Tensor, scaling: float):
        return self.lowrank.attend_store(self.layer_idx, queries, *self._stored(self.store), self.store["token_ids"], scaling)

    def _stored(self, store: dict) -> list:
        """The stored keys and values, or their latents: tensors, or `Quantized` ones."""
        names = ("key_latents", "value_latents") if self.lowrank is not None else ("keys", "values")
        if self.bits is None:
            return [store[name] for name in names]
        return [Quantized(store[f"{name}.q"], store[f"{name}.scale"], self.widths[name]) for name in names]


class ComposedCache(CompressedCache):
    """Gates x low rank x int8/int4 in one cache.

    ``ComposedCache.from_pretrained(gate="gate-dir", lowrank="pca-dir", keep_ratio=0.1, bits=4)``; leave
    out `gate` to keep every token, `lowrank` to store full-width keys and values, or set ``bits=None``
    to store floats. `keep_ratio`, `policy`, `budget` and `max_tokens` are `GatedCache`'s; `group_size`
    numbers share one float16 scale. Sink, window and block size come from the artifacts (the gate's
    first) unless given.
    """

    layer_class = ComposedLayer

    def __init__(
        self, gate: GateCompressor | None = None, lowrank: LowRankCompressor | None = None, *, keep_ratio: float = 0.125,
        policy: str = "head", budget: str = "shared", max_tokens: int | None = None, bits: int | None = 8, group_size: int = 32,
        sink: int | None = None, window: int | None = None, block_size: int | None = None, config=None,
    ):
        if gate is None and lowrank is None and bits is None:
            raise ValueError("ComposedCache needs at least one of gate, lowrank or bits; with none it would be a DynamicCache.")
        if lowrank is not None and not isinstance(lowrank, LowRankCompressor):
            raise TypeError(f"lowrank must be a PCA or KVSplice compressor, got {type(lowrank).__name__}.")
        overrides = {"sink": sink, "window": window, "block_size": block_size}
        settings = {"sink": 4, "window": 64, "block_size": 16}
        for artifact in (lowrank, gate):  # the gate's settings win: it decides what leaves the window
            if artifact is not None:
                settings |= artifact.cache_settings()
        settings |= {name: value for name, value in overrides.items() if value is not None}
        super().__init__(
            config=config, gate=gating(gate, keep_ratio, policy, budget, max_tokens) if gate is not None else None,
            lowrank=lowrank, bits=bits, group_size=group_size, **settings,
        )
        self.gate, self.lowrank, self.keep_ratio, self.bits = gate, lowrank, keep_ratio, bits

    @classmethod
    def from_pretrained(cls, gate=None, lowrank=None, *, revision=None, token=None, **cache_kwargs):
        """A fresh cache from a gate and/or a low-rank compressor (directories or Hub ids); caches share loaded weights."""
        return cls(
            GateCompressor.from_pretrained(gate, revision=revision, token=token) if gate is not None else None,
            LowRankCompressor.from_pretrained(lowrank, revision=revision, token=token) if lowrank is not None else None,
            **cache_kwargs,
        )

    def __repr__(self):
        parts = [f"gate keep_ratio={self.keep_ratio}" if self.gate else None, self.lowrank and repr(self.lowrank), f"int{self.bits}" if self.bits else None]
        return f"ComposedCache({', '.join(filter(None, parts))})"

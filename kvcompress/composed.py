"""Eviction x low rank x quantization in one cache.

The three ways to shrink a KV cache multiply: learned gates decide *which* tokens leaving the recent
window are kept (`GatedCache`), a per-head low-rank projection decides *how many numbers* each kept
token needs (`PCACache` / `KVSpliceCache`), and integer quantization decides *how many bits* each
number gets. `ComposedCache` stacks any of them over the shared core: the gate chooses the slots,
the projection encodes them into latents, and the latents (or the plain keys and values, without a
projection) are stored as int8 or int4 with a float16 scale per group. The sink and the recent
window stay exact. With a projection, attention reads the stored latents as they are (the low-rank
caches' `attend`; the Triton kernel de-quantizes them on chip); without one, the keys and
values are de-quantized while a layer's attention runs.

Each part is the method's own policy (`GateKeep`, `LowRankEncoding`, `QuantizedEncoding`); this file
only stacks them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cache import CompressedCache
from .gate import GateCompressor, GateKeep, gate_keep_ratio
from .hub import check_options
from .lowrank import LowRankCompressor, LowRankEncoding
from .memory import DEFAULT_CONTEXT, resolve_keep_ratio
from .policies import Encoding
from .quantize import QuantizedEncoding, check_quantization
from .settings import CacheSettings

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ComposedCache(CompressedCache):
    """Gates x low rank x int8/int4 in one cache.

    ``ComposedCache.from_pretrained(gate="gate-dir", lowrank="pca-dir", keep_ratio=0.1, bits=4)``; leave
    out `gate` to keep every token, `lowrank` to store full-width keys and values, or set ``bits=None``
    to store floats. `ratio` (reached at `context` tokens), `keep_ratio`, `policy`, `allocation` and `max_tokens` are `GatedCache`'s; `group_size`
    numbers share one float16 scale. Sink, window and block size come from the artifacts (the gate's
    first) unless given.
    """

    def __init__(
        self, gate: GateCompressor | None = None, lowrank: LowRankCompressor | None = None, *, keep_ratio: float | None = None,
        ratio: float | None = None, context: int = DEFAULT_CONTEXT, policy: str = "head", allocation: str = "shared", max_tokens: int | None = None,
        bits: int | None = 8, group_size: int = 32, sink: int | None = None, window: int | None = None, block_size: int | None = None, config: PretrainedConfig | None = None,
    ) -> None:
        if gate is None and lowrank is None and bits is None:
            raise ValueError("ComposedCache needs at least one of gate, lowrank or bits; with none it would be a DynamicCache.")
        if lowrank is not None and not isinstance(lowrank, LowRankCompressor):
            raise TypeError(f"lowrank must be a PCA or KVSplice compressor, got {type(lowrank).__name__}.")
        check_quantization(bits, group_size)
        fitted: dict = {}
        for artifact in (lowrank, gate):  # the gate's settings win: it decides what leaves the window
            if artifact is not None:
                fitted |= artifact.cache_settings()
        settings = CacheSettings.resolve({"block_size": 16}, fitted, sink=sink, window=window, block_size=block_size)
        keep = None
        if gate is not None:
            keep = GateKeep(gate, 1.0, policy, allocation, max_tokens)  # the per-head policy decides the latents' layout
        else:
            given = {"keep_ratio": keep_ratio, "ratio": ratio, "max_tokens": max_tokens, "policy": None if policy == "head" else policy,
                     "allocation": None if allocation == "shared" else allocation}
            if any(value is not None for value in given.values()):
                raise ValueError(f"{', '.join(name for name, value in given.items() if value is not None)} choose what a gate keeps; ComposedCache without a gate keeps every token.")
        encoding = LowRankEncoding(lowrank, per_head=keep is not None and keep.per_head) if lowrank is not None else Encoding()
        if bits is not None:
            encoding = QuantizedEncoding(bits, group_size, encoding)
        if gate is not None:
            cost = self.kept_token_cost(gate, encoding)
            keep_ratio = resolve_keep_ratio(
                keep_ratio, ratio, context, lambda: gate_keep_ratio(gate, ratio, settings, context, policy, allocation, cost), gate.default_keep_ratio,
            )
            keep = GateKeep(gate, keep_ratio, policy, allocation, max_tokens)
        super().__init__(keep, encoding, fitted=vars(settings), config=config)
        self.gate, self.lowrank, self.keep_ratio, self.bits = gate, lowrank, keep_ratio, bits

    @staticmethod
    def kept_token_cost(gate: GateCompressor, encoding: Encoding, dtype_bytes: int = 4) -> float:
        """Dense tokens' worth of memory per kept token-head: its numbers as `encoding` holds them, averaged over layers, plus a
        token id and a gate score (4 bytes each), against dense numbers of `dtype_bytes` (float32: the pretrained compressors')."""
        base = gate.config["base_model"]
        layers, dim = base["num_layers"], base["head_dim"]
        numbers = sum(encoding.slot_bytes(layer, dim, dtype_bytes) for layer in range(layers)) / layers
        return (numbers + 8) / (2 * dim * dtype_bytes)

    @classmethod
    def from_pretrained(cls, gate=None, lowrank=None, *, revision=None, token=None, **cache_kwargs):
        """A fresh cache from a gate and/or a low-rank compressor (directories or Hub ids); caches share loaded weights."""
        check_options(cls, cache_kwargs)
        return cls(
            GateCompressor.from_pretrained(gate, revision=revision, token=token) if gate is not None else None,
            LowRankCompressor.from_pretrained(lowrank, revision=revision, token=token) if lowrank is not None else None,
            **cache_kwargs,
        )

    def __repr__(self):
        parts = [f"gate keep_ratio={self.keep_ratio}" if self.gate else None, self.lowrank and repr(self.lowrank), f"int{self.bits}" if self.bits else None]
        return f"ComposedCache({', '.join(filter(None, parts))})"

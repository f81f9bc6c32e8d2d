"""Low-rank caches: tokens that leave the recent window are stored as per-head rank-r latents.

Per layer and KV head, an affine encoder maps a key (or value) of `head_dim` numbers to `rank`
latent numbers and a decoder maps them back; keys and values have their own ranks, and every head
its own. `PCACache` uses principal components of calibration keys and values; `KVSpliceCache` a
learned encoder/decoder trained on the attention output (see `kvcompress/calibration/lowrank.py`). The
runtime is the same for both.

Keys are compressed *before* RoPE: a key's rotation depends on its position, which spreads it over
every dimension; the cache undoes the rotation (positions are the token ids, as `generate()`
assigns them), encodes, and rotates the decoded key back when attention reads it. On SmolLM2 this
roughly halves the perplexity cost of a given key rank.

The store holds only latents ``[B, 1, slots, sum of the layer's ranks]`` (heads side by side, so
heterogeneous ranks cost no padding). Attention reads them as they are (`attends_store`): values
are mixed in latent space and decoded once per query, ``(P Z) W + (sum P) b``; keys are decoded
and rotated block by block, on chip by a Triton kernel on a GPU (`kvcompress.latent_attention`).
The full keys and values of the store never exist at once (`decode` is the plain inverse,
which the tests check attention against). The attention sink and the recent window stay exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import latent_attention
from .attention import SCORES_PER_CHUNK
from .config import RankConfig
from .hub import CompressorArtifact, FittedCache
from .memory import DEFAULT_CONTEXT, slot_cost, window_for
from .policies import Encoding, LayerView
from .quantize import Quantized
from .rope import paired_order, rope_table, rotate, rotate_pairs_
from .schema import Field
from .settings import CacheSettings
from .slots import FILLER
from .softmax import merge_softmax, softmax_part_

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class AffineProjection:
    """One layer's per-head encoders and decoders for keys or values, padded to the layer's largest rank."""

    encoder: torch.Tensor  # [H, D, R]
    encoder_bias: torch.Tensor  # [H, 1, R]
    decoder: torch.Tensor  # [H, R, D]
    decoder_bias: torch.Tensor  # [H, 1, D]
    columns: torch.Tensor  # [sum of ranks]: where each head's latents sit in the flattened [H * R] padded layout
    head_columns: torch.Tensor  # [H, 2] int32: where each head's latents start in the shared layout [..., sum of ranks], and how many
    padded_columns: torch.Tensor  # [H, 2] int32: the same in the per-head layout [..., largest rank]: 0, and every column
    uniform: bool  # every head has the largest rank
    head_slices: list[slice]  # each head's columns in the shared layout
    head_decoders: list[tuple[torch.Tensor, torch.Tensor]]  # each head's (decoder bias [D], unpadded decoder [r, D])
    stacked_decoder: torch.Tensor  # [sum of ranks, D]: the heads' decoders, unpadded, one under the other
    own_columns: torch.Tensor  # [H, 1, sum of ranks]: 1 where a column of the shared layout is the head's
    window_columns: torch.Tensor | None  # [H, 2] int32: each head's aligned window in the shared layout (`latent_attention.aligned_windows`), and its width
    window_decoder: torch.Tensor | None  # [H, width, D]: each head's decoder rows at its columns' offset in its window, zeros elsewhere

    @classmethod
    def from_heads(cls, heads: list[dict], device, dtype) -> AffineProjection:
        """`heads`: per head ``encoder [D, r]``, ``encoder_bias [r]``, ``decoder [r, D]``, ``decoder_bias [D]``."""
        largest = max(head["encoder"].shape[1] for head in heads)
        dim = heads[0]["encoder"].shape[0]
        encoder = torch.zeros(len(heads), dim, largest)
        encoder_bias = torch.zeros(len(heads), 1, largest)
        decoder = torch.zeros(len(heads), largest, dim)
        columns = []
        for index, head in enumerate(heads):
            rank = head["encoder"].shape[1]
            encoder[index, :, :rank] = head["encoder"]
            encoder_bias[index, 0, :rank] = head["encoder_bias"]
            decoder[index, :rank] = head["decoder"]
            columns.append(index * largest + torch.arange(rank))
        decoder_bias = torch.stack([head["decoder_bias"] for head in heads])[:, None]
        ranks = torch.tensor([len(head_columns) for head_columns in columns])
        starts = (ranks.cumsum(0) - ranks).tolist()
        head_slices = [slice(start, start + rank) for start, rank in zip(starts, ranks.tolist())]
        own_columns = torch.zeros(len(heads), 1, int(ranks.sum()))
        for index, part in enumerate(head_slices):
            own_columns[index, :, part] = 1
        head_columns = torch.stack([ranks.cumsum(0) - ranks, ranks], dim=1).to(device=device, dtype=torch.int32)
        padded_columns = torch.tensor([[0, largest]] * len(heads), device=device, dtype=torch.int32)
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        uniform = bool((ranks == largest).all())
        stacked = move(torch.cat([head["decoder"] for head in heads]))
        decoder_bias = move(decoder_bias)
        head_decoders = [(decoder_bias[index, 0], stacked[part]) for index, part in enumerate(head_slices)]
        window_columns = window_decoder = None
        if (windows := latent_attention.aligned_windows(ranks.tolist())) is not None:
            window_starts, width = windows
            window_columns = torch.tensor([[start, width] for start in window_starts], device=device, dtype=torch.int32)
            window_decoder = torch.zeros(len(heads), width, dim)
            for index, (start, part) in enumerate(zip(window_starts, head_slices)):
                window_decoder[index, part.start - start : part.stop - start] = heads[index]["decoder"]
            window_decoder = move(window_decoder)
        return cls(
            move(encoder), move(encoder_bias), move(decoder), decoder_bias, torch.cat(columns).to(device), head_columns, padded_columns, uniform,
            head_slices, head_decoders, stacked, move(own_columns), window_columns, window_decoder,
        )

    def encode(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """``[B, H, n, D]`` -> latents ``[B, 1, n, sum of ranks]`` (slots aligned across heads), or with
        `per_head` ``[B, H, n, largest rank]`` (each head its own slots; smaller ranks zero-padded)."""
        latents = torch.matmul(x, self.encoder) + self.encoder_bias
        return latents if per_head else latents.transpose(1, 2).flatten(2)[..., self.columns][:, None]

    def shared(self, latents: torch.Tensor) -> bool:
        """Whether `latents` are in the shared layout (heads side by side) rather than the per-head one."""
        return latents.shape[1] == 1 and self.encoder.shape[0] > 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents of either layout -> ``[B, H, n, D]``: each head's columns times its decoder (no padded copy of the latents)."""
        if not self.shared(latents):
            return torch.matmul(latents, self.decoder) + self.decoder_bias
        batch, _, length, _ = latents.shape
        keys = latents.new_empty(batch, len(self.head_slices), length, self.decoder.shape[-1])
        for row_keys, row_latents in zip(keys, latents[:, 0]):
            for head_keys, part, (bias, decoder) in zip(row_keys, self.head_slices, self.head_decoders):
                torch.addmm(bias, row_latents[:, part], decoder, out=head_keys)
        return keys

    def decode_mixed(self, mixed: torch.Tensor) -> torch.Tensor:
        """Weighted sums of latent rows ``[B, H, R, columns]`` in the projection's dtype, each query row's over the whole
        layout -> ``[B, H, R, D]`` (without the bias): in the shared layout each head keeps its own columns."""
        if mixed.shape[-1] == self.decoder.shape[1]:  # the per-head layout
            return torch.matmul(mixed, self.decoder)
        return torch.matmul(mixed * self.own_columns, self.stacked_decoder)

    def kernel_layout(self, latents) -> tuple[torch.Tensor, tuple[torch.Tensor, int | None], int]:
        """How the Triton kernel reads `latents` (either layout; floats or `Quantized`): (the decoder ``[H, width, D]``
        that goes with what it reads, (where each head's latents sit in the last dimension: ``[H, 2]`` int32 start and
        count, and the step from one head's start to the next's when every head has all of the largest rank's columns
        (0 in the per-head layout), `latent_attention.WINDOWS` when they are aligned windows, else None), width)."""
        largest = self.decoder.shape[1]
        if latents.shape[1] > 1:
            return self.decoder, (self.padded_columns, 0), largest
        if self.uniform and latent_attention.whole_rows(largest):
            return self.decoder, (self.head_columns, largest), largest
        if self.window_columns is not None:
            return self.window_decoder, (self.window_columns, latent_attention.WINDOWS), self.window_decoder.shape[1]
        return self.decoder, (self.head_columns, None), largest


class LowRankCompressor(CompressorArtifact):
    """Fitted per-head affine encoders/decoders for keys (pre-RoPE) and values, with their rank config.

    Tensors: ``rope.inv_freq`` and, per layer l, head h and kind in (key, value),
    ``layers.{l}.heads.{h}.{kind}.{encoder,encoder_bias,decoder,decoder_bias}``.
    """

    config_schema = CompressorArtifact.config_schema | {"ranks": Field(dict)}  # the rank config (`RankConfig.from_json` checks it)

    def read_config(self) -> None:
        base = self.config["base_model"]
        self.ranks = RankConfig.from_json(self.config["ranks"], base["num_layers"], base["num_kv_heads"], base["head_dim"], base["head_dim"])

    def expected_tensors(self) -> dict[str, tuple]:
        dim = self.config["base_model"]["head_dim"]
        expected = super().expected_tensors()
        for (layer, head), ranks in self.ranks.heads.items():
            for kind, rank in (("key", ranks.key), ("value", ranks.value)):
                prefix = f"layers.{layer}.heads.{head}.{kind}."
                expected |= {prefix + "encoder": (dim, rank), prefix + "encoder_bias": (rank,), prefix + "decoder": (rank, dim), prefix + "decoder_bias": (dim,)}
        return expected

    @classmethod
    def from_heads(cls, key_heads: list[dict], value_heads: list[dict], inv_freq: torch.Tensor, config: dict) -> LowRankCompressor:
        """The artifact of per-head projections, layer by layer then head by head (``encoder [D, r]``, ``encoder_bias [r]``,
        ``decoder [r, D]``, ``decoder_bias [D]`` each), with the model's RoPE frequencies (`kvcompress.rope.rope_inv_freq`).
        `config` holds ``base_model`` (`kvcompress.hub.model_signature`), ``cache`` and ``ranks`` (`RankConfig.to_json`)."""
        num_heads = config["base_model"]["num_kv_heads"]
        tensors = {"rope.inv_freq": inv_freq.float().contiguous()}
        for kind, heads in (("key", key_heads), ("value", value_heads)):
            for group, head in enumerate(heads):
                prefix = f"layers.{group // num_heads}.heads.{group % num_heads}.{kind}."
                tensors |= {prefix + name: tensor.float().contiguous() for name, tensor in head.items()}
        return cls(config, tensors)

    def projections(self, layer_idx: int, device, dtype) -> tuple[AffineProjection, AffineProjection]:
        """(keys, values) projections of a layer on `device` in `dtype`, built once and shared by every cache."""
        return self.on_device(f"layers.{layer_idx}.{dtype}", device, lambda: tuple(
            AffineProjection.from_heads([self._head(layer_idx, head, kind) for head in self.heads], device, dtype) for kind in ("key", "value")
        ))

    def paired_key_projection(self, layer_idx: int, device, dtype) -> AffineProjection:
        """The layer's key projection with each head's decoded dimensions in RoPE pairs side by side (`kvcompress.rope.paired_order`),
        for `decode_keys`, which turns them as complex numbers."""
        def build():
            order = paired_order(self.config["base_model"]["head_dim"])
            heads = [self._head(layer_idx, head, "key") for head in self.heads]
            return AffineProjection.from_heads([head | {"decoder": head["decoder"][:, order], "decoder_bias": head["decoder_bias"][order]} for head in heads], device, dtype)
        return self.on_device(f"layers.{layer_idx}.paired_keys.{dtype}", device, build)

    def layer_ranks(self, layer_idx: int) -> tuple[list[int], list[int]]:
        """(key ranks, value ranks) of the layer's served heads."""
        return tuple(ranks[self.heads.start : self.heads.stop] for ranks in self.ranks.layer_ranks(layer_idx))

    def encode(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor, per_head: bool = False) -> dict:
        """Latents of a layer's keys (un-rotated at their token ids first) and values; see `AffineProjection.encode`."""
        key_projection, value_projection = self.projections(layer_idx, keys.device, keys.dtype)
        positions = token_ids if per_head else token_ids[:, 0]
        unrotated = rotate(keys, positions, self.inv_freq(keys.device), inverse=True)
        return {"key_latents": key_projection.encode(unrotated, per_head), "value_latents": value_projection.encode(values, per_head)}

    def decode(self, layer_idx: int, key_latents: torch.Tensor, value_latents: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated back to their token ids) and values ``[B, H, n, D]`` from latents of either layout."""
        return self.decode_keys(layer_idx, key_latents, token_ids), self.projections(layer_idx, value_latents.device, value_latents.dtype)[1].decode(value_latents)

    def decode_keys(self, layer_idx: int, key_latents: torch.Tensor, token_ids: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """Keys ``[B, H, n, D]`` from latents of either layout, rotated back to their token ids; with `paired`, their dimensions in
        `kvcompress.rope.paired_order` (as RoPE turns them: attention permutes its queries alike instead of the many keys)."""
        projection = self.paired_key_projection(layer_idx, key_latents.device, key_latents.dtype)
        positions = (token_ids if key_latents.shape[1] > 1 else token_ids[:, 0]).clamp(min=0)  # fillers read position 0
        table = self.rope_table(key_latents.device, int(token_ids.max()) + 1)
        keys = rotate_pairs_(projection.decode(key_latents), torch.nn.functional.embedding(positions, table))
        return keys if paired else keys.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)

    def rope_table(self, device, positions: int) -> torch.Tensor:
        """cos and sin of the positions below `positions` at least (`kvcompress.rope.rope_table`), built once per doubling."""
        length = max(4096, 1 << (positions - 1).bit_length())
        return self.on_device(f"rope.table.{length}", device, lambda: rope_table(self.inv_freq(device), length))

    def attend_store(self, layer_idx: int, queries: torch.Tensor, key_latents, value_latents, token_ids: torch.Tensor, scaling: float):
        """Query rows' partial softmax over a store of latents (floats or `Quantized`), without decoding it to keys and values
        (see `Encoding.attend`).

        Values are mixed in latent space, in float32, and decoded once per query row (by the projection in float32, built once
        like the others, rather than converted at each call). Keys are decoded on chip by
        the Triton kernel (`kvcompress.latent_attention`) where it runs, else here, in PyTorch, a
        chunk of slots at a time (at most `SCORES_PER_CHUNK` logits at once).
        """
        value_projection = self.projections(layer_idx, queries.device, torch.float32)[1]
        if latent_attention.available(queries):
            key_projection = self.projections(layer_idx, queries.device, queries.dtype)[0]
            inv_freq = self.inv_freq(queries.device)
            key_decoder, key_columns, _ = key_projection.kernel_layout(key_latents)
            value_decoder, value_columns, value_width = value_projection.kernel_layout(value_latents)
            top, total, latents = latent_attention.store_partials(
                queries, key_latents, value_latents, token_ids, key_decoder, key_projection.decoder_bias, key_columns, value_columns, value_width, inv_freq, scaling,
            )
            values = torch.matmul(latents, value_decoder)
        else:
            key_latents, value_latents = (x.dequantize(queries.dtype) if isinstance(x, Quantized) else x for x in (key_latents, value_latents))
            batch, heads, rows, dim = queries.shape
            paired_queries = queries[..., self.on_device("rope.paired_order", queries.device, lambda: paired_order(dim).to(queries.device))] * scaling
            fillers = bool((token_ids == FILLER).any())  # most stores have none: no mask to build then
            chunk = max(1, SCORES_PER_CHUNK // (batch * heads * rows))
            parts = []
            for start in range(0, token_ids.shape[2], chunk):
                ids = token_ids[:, :, start : start + chunk]
                keys = self.decode_keys(layer_idx, key_latents[:, :, start : start + chunk], ids, paired=True)
                logits = torch.matmul(paired_queries, keys.transpose(-1, -2)).float()
                if fillers:
                    logits.masked_fill_((ids == FILLER)[:, :, None], float("-inf"))
                parts.append(softmax_part_(logits, value_latents[:, :, start : start + chunk]))  # values mixed in either layout
            top, total, latents = parts[0] if len(parts) == 1 else merge_softmax(*(torch.stack(part) for part in zip(*parts)), dim=0)
            values = value_projection.decode_mixed(latents)
        return top, total, torch.addcmul(values, total[..., None], value_projection.decoder_bias)

    def _head(self, layer: int, head: int, kind: str) -> dict:
        prefix = f"layers.{layer}.heads.{head}.{kind}."
        return {name: self.tensors[prefix + name] for name in ("encoder", "encoder_bias", "decoder", "decoder_bias")}

    def __repr__(self):
        return f"{type(self).__name__}({self.config['base_model'].get('name_or_path')}, {100 * self.ranks.memory_fraction():.0f}% of dense K/V)"


class PCACompressor(LowRankCompressor):
    method = "pca"
    cache_class_name = "PCACache"


class KVSpliceCompressor(LowRankCompressor):
    method = "kvsplice"
    cache_class_name = "KVSpliceCache"


class LowRankEncoding(Encoding):
    """Slots held as per-head latents of a low-rank compressor's projections; attention reads the latents as they are.

    `per_head`: latents per KV head (for keep policies whose heads keep different tokens) rather than one
    row of latents per token shared by the heads side by side."""

    plain = False
    attends_store = True

    def __init__(self, compressor: LowRankCompressor, per_head: bool = False):
        if not isinstance(compressor, LowRankCompressor):
            raise TypeError(f"A low-rank encoding needs a PCA or KVSplice compressor, got {type(compressor).__name__}.")
        self.compressor, self.per_head, self.artifacts = compressor, per_head, (compressor,)

    def __repr__(self):
        return f"{type(self).__name__}({self.compressor!r}{', per head' if self.per_head else ''})"

    def for_heads(self, heads: range) -> LowRankEncoding:
        served = copy.copy(self)  # a subclass stays itself
        served.compressor = self.compressor.for_heads(heads)
        served.artifacts = (served.compressor,)
        return served

    def widths(self, layer_idx: int, head_dim: int) -> list[tuple[int, int]]:
        per_kind = self.compressor.layer_ranks(layer_idx)
        if self.per_head:  # each head's latents padded to the layer's largest rank
            return [(max(kind), 1) for kind in per_kind]
        return [(sum(kind), len(kind)) for kind in per_kind]  # heads side by side in one row per token

    def encode(self, layer: LayerView, slots: dict) -> dict:
        latents = self.compressor.encode(layer.layer_idx, slots["keys"], slots["values"], slots["token_ids"], per_head=self.per_head)
        return {name: value for name, value in slots.items() if name not in ("keys", "values") and value is not None} | latents

    def decode(self, layer: LayerView, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compressor.decode(layer.layer_idx, store["key_latents"], store["value_latents"], store["token_ids"])

    def attend(self, layer: LayerView, store: dict, queries: torch.Tensor, scaling: float):
        return self.compressor.attend_store(layer.layer_idx, queries, store["key_latents"], store["value_latents"], store["token_ids"], scaling)


class _LowRankCache(FittedCache):
    """Sink and recent window exact; every older token as per-head latents of the compressor's projections.

    `ratio`: the memory knob, dense bytes over held bytes at `context` tokens. The latents' size is the
    compressor's (its ranks); a lower ratio than theirs buys a longer exact window, a higher one is refused.
    """

    artifact_class: type[LowRankCompressor] = LowRankCompressor

    def __init__(
        self, compressor: LowRankCompressor, *, ratio: float | None = None, context: int = DEFAULT_CONTEXT, sink: int | None = None,
        window: int | None = None, block_size: int | None = None, config: PretrainedConfig | None = None,
    ) -> None:
        if not isinstance(compressor, self.artifact_class):
            raise TypeError(f"{type(self).__name__} needs a {self.artifact_class.__name__}, got {type(compressor).__name__}.")
        settings = CacheSettings.resolve(compressor.cache_settings(), sink=sink, window=window, block_size=block_size)
        dim = compressor.config["base_model"]["head_dim"]
        cost = slot_cost(2 * dim * compressor.ranks.memory_fraction(), dim, extra_bytes=4)  # latents and a token id
        window = window_for(ratio, window, context, cost, settings, repr(compressor))
        super().__init__(encoding=LowRankEncoding(compressor), fitted=vars(settings), window=window, config=config)
        self.compressor = compressor


class PCACache(_LowRankCache):
    """Per-head PCA bases for keys (pre-RoPE) and values. ``PCACache.from_pretrained("dir-or-hub-id")``."""

    artifact_class = PCACompressor


class KVSpliceCache(_LowRankCache):
    """Per-head learned linear encoder/decoder. ``KVSpliceCache.from_pretrained("dir-or-hub-id")``."""

    artifact_class = KVSpliceCompressor

"""Attention routing: how a compressed cache layer takes part in the attention it feeds.

A `transformers.Cache` only sees keys and values (`update`); it never sees the queries or the mask.
Compressed caches need both: slots that hold evicted-row filler or merged tokens do not map to
positions, so the positional mask transformers builds is wrong for them; H2O needs the attention
its tokens receive; padding must be known to keep each row's sink and window in its own tokens.

kvcompress registers two attention implementations with transformers' `AttentionInterface`:
`kvcompress_sdpa` and `kvcompress_eager`. For a model without a compressed cache they are exactly
sdpa / eager. With one, `CompressedCache.update` leaves the layer it updated as *pending*; the
attention function of that layer picks it up, attends over the layer's slots with its own per-slot
mask and bias when needed, and hands back what the layer needs to compress: which new tokens are
padding and, if asked, the attention each slot got. A multi-token forward whose positional mask is
still right (no filler slots) defers to the base implementation unchanged.

kvcompress's own attention packs the query heads that share a KV head as the rows of one query, so
each key is read once per step; transformers' sdpa with `enable_gqa` gives every query head its own
pass over the keys. Decode steps always take this path.

The one extra line for a model not loaded by `kvcompress.load_model` is `kvcompress.enable(model)`.
A compressed cache used without it raises at its next update instead of silently going wrong.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from . import scored_attention

# decoders whose attention is Llama's: keys rotated by RoPE over the whole head (rotate_half), softmax scaled by
# head_dim ** -0.5, the cache updated before the attention interface is called (tests/conftest.py builds each)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2", "gemma")
BASE_IMPLEMENTATIONS = {"sdpa": "kvcompress_sdpa", "eager": "kvcompress_eager"}

SCORES_PER_CHUNK = 2**26  # attention scores held at once by `_attend_over_slots` (256 MB in float32)
# Not cuDNN: it builds an execution plan for every new key length (~45 ms each on an H100), and a
# compressed cache's table changes length every decode step.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_pending = threading.local()


class AttentionNotEnabledError(RuntimeError):
    """A compressed cache was updated but the model's attention does not route through kvcompress."""


def check_supported_config(config) -> None:
    """Raise if a model config is not a Llama-family decoder whose every layer attends to every earlier token."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"kvcompress supports Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model is '{model_type}'. Use one of the supported architectures."
        )
    window = getattr(config, "sliding_window", None)
    # configs with layer_types say which layers slide (their sliding_window alone may be a leftover); the others slide everywhere when it is set
    layer_types = getattr(config, "layer_types", None) or ["full_attention" if window is None else "sliding_attention"]
    limited = sorted({kind for kind in layer_types if kind != "full_attention" and (kind != "sliding_attention" or window_hides_tokens(window, config))})
    if limited:
        window_note = f" (a window of {window} tokens, under its {config.max_position_embeddings} positions)" if "sliding_attention" in limited else ""
        raise ValueError(
            f"kvcompress needs full attention in every layer; this {model_type} model has {', '.join(limited)} layers{window_note}. "
            "Disable sliding-window attention in its config (sliding_window=None): the model then attends to every earlier token, "
            "which changes its outputs beyond the window it was trained with."
        )


def window_hides_tokens(sliding_window: int | None, config) -> bool:
    """Whether a sliding window hides earlier tokens from a model: one that spans all its positions hides none."""
    return bool(sliding_window) and sliding_window < config.max_position_embeddings


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Route `model`'s attention through kvcompress so compressed caches work under `generate()`.

    Keeps the model's base implementation (sdpa or eager); returns the model for chaining.
    """
    check_supported_config(model.config)
    current = model.config._attn_implementation
    if current in BASE_IMPLEMENTATIONS.values():
        return model
    if current not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"kvcompress wraps 'sdpa' or 'eager' attention; this model uses '{current}'. "
            "Load it with attn_implementation='sdpa' (or 'eager') first."
        )
    model.set_attn_implementation(BASE_IMPLEMENTATIONS[current])
    return model


class AttentionLayer(Protocol):
    """What kvcompress attention asks of a cache layer (`kvcompress.cache.CompressedLayer` is the one implementation)."""

    layer_idx: int
    tracks_attention: bool  # attention must report the mass each slot receives (to `after_attention`)
    store_attended: bool  # `update` returned only the tail: the layer attends its store itself (`attend_with_store`)

    def check_module(self, module, attention_kwargs: dict) -> None:
        """Refuse a model or attention feature the layer cannot serve."""

    def needs_slot_mask(self) -> bool:
        """Whether the slots need the layer's own mask (fillers, biases, tracking) rather than the positional one."""

    def slot_filled(self, length: int) -> torch.Tensor:
        """Which of the first `length` table slots hold a token ``[B, H, length]``."""

    def slot_bias(self, length: int) -> torch.Tensor | None:
        """Additive logit bias of the first `length` table slots, if the layer has any."""

    def attend_with_store(self, query: torch.Tensor, new_keep: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention output ``[B, q, heads, D]`` over the layer's store and its exact tail."""

    def after_attention(self, new_valid: torch.Tensor | None, received: torch.Tensor | None) -> None:
        """Record which new tokens were padding and the attention slots received; compress what is due."""


def expect_attention(layer: AttentionLayer, keys: torch.Tensor) -> None:
    """Called by the cache after each update: the layer's attention, over `keys`, must come next and collect it."""
    stale = getattr(_pending, "entry", None)
    if stale is not None:
        _pending.entry = None
        raise AttentionNotEnabledError(
            f"The kvcompress attention did not run after the cache update of layer {stale[0].layer_idx}: "
            "the model's attention does not route through kvcompress. Call kvcompress.enable(model) once "
            "(or load the model with kvcompress.load_model, or attn_implementation='kvcompress_sdpa'); enable refuses, saying why, a "
            "model whose architecture kvcompress does not support."
        )
    _pending.entry = (layer, keys)


def _take_pending(module, key: torch.Tensor) -> AttentionLayer | None:
    """The compressed layer whose update produced `key`, if any."""
    entry = getattr(_pending, "entry", None)
    _pending.entry = None
    if entry is None or entry[1] is not key:  # no compressed cache, or a forward that died before its attention
        return None
    layer = entry[0]
    if layer.layer_idx != getattr(module, "layer_idx", None):
        raise RuntimeError(
            f"Cache layer {layer.layer_idx} was updated but attention ran for layer "
            f"{getattr(module, 'layer_idx', None)}; kvcompress caches need one update per attention call."
        )
    return layer


def _new_token_validity(attention_mask, q_len: int):
    """Which new tokens are real ([B, q]) according to transformers' 4D mask; None when there is no padding."""
    if attention_mask is None:
        return None
    return _new_token_keep(attention_mask, q_len).any(dim=-2)[:, 0]


@functools.cache
def _one_sees_itself(device) -> torch.Tensor:
    """A decode step's `_new_token_keep` without a mask, made once per device (every layer of every step asks for it)."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def _new_token_keep(attention_mask, q_len: int, device=None):
    """What each new query may see among the new tokens ([B or 1, 1, q, q] bool): causal and padding."""
    if attention_mask is None:
        return _one_sees_itself(device) if q_len == 1 else torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask.shape[-1] < q_len:
        raise RuntimeError(f"Attention mask of length {attention_mask.shape[-1]} is shorter than the {q_len} new tokens.")
    new = attention_mask[..., -q_len:]
    return new if new.dtype == torch.bool else new > torch.finfo(new.dtype).min / 2


def _attend_over_slots(layer: AttentionLayer, query, key, value, new_keep, query_valid, scaling):
    """Grouped-query attention over the layer's slots with its filler mask and bias; also the attention each slot got.

    Fused sdpa with the mask and bias as an additive logit mask (none when a single query sees every
    slot), unless the layer tracks the attention its slots receive (H2O), which needs the probabilities
    themselves: for one new token on a GPU `kvcompress.scored_attention`'s kernel gives them, else
    PyTorch does. Queries go in chunks so that at most `SCORES_PER_CHUNK` scores (or mask entries) exist
    at once (long prefills).
    """
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups, old_len = num_heads // kv_heads, kv_len - q_len
    grouped = query.view(batch, kv_heads, groups, q_len, head_dim)
    if layer.tracks_attention and q_len == 1:
        if scored_attention.available(query) and groups <= scored_attention.MOST_ROWS:
            return _attend_scoring_one_token(layer, grouped[:, :, :, 0], key, value, new_keep, scaling)
    unmasked = q_len == 1 and not layer.needs_slot_mask()
    old_keep = None if unmasked else layer.slot_filled(old_len)[:, :, None, None, :]
    bias = layer.slot_bias(old_len)
    chunk = max(1, SCORES_PER_CHUNK // (batch * num_heads * kv_len))
    outputs, received = [], 0.0
    for start in range(0, q_len, chunk):
        queries = grouped[:, :, :, start : start + chunk]
        size = queries.shape[3]
        rows = queries.reshape(batch, kv_heads, groups * size, head_dim)  # the query heads of a KV head share its pass
        keep = None if unmasked else torch.cat(
            [old_keep.expand(batch, kv_heads, 1, size, old_len), new_keep[:, None, :, start : start + size].expand(batch, kv_heads, 1, size, q_len)],
            dim=-1,
        )  # [B, H_kv, 1 (all query heads of the group), size, kv_len]
        if layer.tracks_attention:
            scores = torch.matmul(rows, key.transpose(-1, -2)).view(batch, kv_heads, groups, size, kv_len).float() * scaling
            if bias is not None:
                scores[..., :old_len] += bias[:, :, None, None, :]
            probs = scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(dim=-1)
            outputs.append(torch.matmul(probs.to(value.dtype).view(batch, kv_heads, groups * size, kv_len), value).view(batch, kv_heads, groups, size, head_dim))
            if query_valid is not None:
                probs = probs * query_valid[:, None, None, start : start + size, None]
            received = received + probs.sum(dim=(2, 3))
            continue
        logits = None
        if not unmasked:
            logits = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
            if bias is not None:
                logits[..., :old_len] += bias[:, :, None, None, :].to(query.dtype)
            logits.masked_fill_(~keep, torch.finfo(query.dtype).min)  # finite: a row with nothing to see (padding) stays finite
            logits = logits[:, :, 0] if size == 1 else logits.expand(batch, kv_heads, groups, size, kv_len).reshape(batch, kv_heads, groups * size, kv_len)
        with sdpa_kernel(SDPA_BACKENDS) if query.is_cuda else contextlib.nullcontext():  # the backends differ on the GPU only
            output = F.scaled_dot_product_attention(rows, key, value, attn_mask=logits, scale=scaling)
        outputs.append(output.reshape(batch, kv_heads, groups, size, head_dim))  # a GPU kernel may lay it out as the query rows are
    output = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)).reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).contiguous()
    return output, (received if layer.tracks_attention else None)


def _attend_scoring_one_token(layer: AttentionLayer, rows, key, value, new_keep, scaling):
    """`_attend_over_slots` for one new token on a GPU, by `kvcompress.scored_attention`'s kernels: one read of the keys
    gives the attention and the logits that the probabilities each slot received come from. A padding token does not
    see itself (`new_keep`), and its attention counts for no slot."""
    batch, kv_heads, groups, head_dim = rows.shape
    output, received = scored_attention.attend_and_score(rows, key, value, layer.table_token_ids(), layer.slot_bias(key.shape[2] - 1), new_keep.reshape(-1), scaling)
    return output.view(batch, 1, kv_heads * groups, head_dim), received


def _compressed_attention(base, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = _take_pending(module, key)
    if layer is None:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer.check_module(module, kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    new_valid = _new_token_validity(attention_mask, q_len)
    mask_fits = attention_mask is None or attention_mask.shape[-1] == kv_len
    if layer.needs_slot_mask() or layer.store_attended or not mask_fits or q_len == 1:
        if dropout and module.training:
            raise RuntimeError("kvcompress caches are for inference; attention dropout in training mode is not supported.")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        new_keep = _new_token_keep(attention_mask, q_len, query.device)
        if layer.store_attended:  # `key` and `value` are the tail's: the method attends its store itself
            output, received = layer.attend_with_store(query, new_keep, scaling), None
        else:
            output, received = _attend_over_slots(layer, query, key, value, new_keep, new_valid, scaling)
        weights = None
    else:
        output, weights = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        received = None
    layer.after_attention(new_valid, received)
    return output, weights


def kvcompress_sdpa(module, query, key, value, attention_mask, **kwargs):
    return _compressed_attention(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)


def kvcompress_eager(module, query, key, value, attention_mask, **kwargs):
    return _compressed_attention(eager_attention_forward, module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("kvcompress_sdpa", kvcompress_sdpa)
AttentionInterface.register("kvcompress_eager", kvcompress_eager)
AttentionMaskInterface.register("kvcompress_sdpa", sdpa_mask)
AttentionMaskInterface.register("kvcompress_eager", eager_mask)

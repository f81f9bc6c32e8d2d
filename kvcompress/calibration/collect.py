"""Collection: run the frozen model over a corpus and sample what its attention sees.

Per layer and KV head we keep a uniform sample of the post-RoPE keys and the values (the same
tokens for every layer and head, so keys and values stay paired) and a uniform sample of the
queries of the head's GQA group. Memory is bounded by reservoir sampling: each streamed item gets a
random priority and the `samples` items with the smallest priorities are kept, which is a uniform
sample without replacement of everything seen.

The model's attention is observed through a recording attention implementation, registered with
transformers like kvcompress' own, so nothing model-specific (q/k norms, RoPE variants) is redone.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TAP_IMPLEMENTATION = "kvcompress_tap"
SAMPLE_SEQUENCE = 1024  # tokens per sequence the samples are collected in (a shorter rest is a sequence too)
_tap = threading.local()


@dataclass
class AttentionSamples:
    """Samples per layer and KV head. Shapes: keys/values ``[layers, kv_heads, n, head_dim]``, queries ``[layers, kv_heads, m, head_dim]``.

    `token_index` ``[n]`` and `query_token_index` ``[m]`` are positions in the collected token stream,
    which the model saw in sequences of `sequence_length` tokens (so a token's position in its
    sequence, its RoPE position, is its index modulo `sequence_length`); `query_member` ``[m]`` says
    which query head of the group (0..groups-1) each query came from.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    token_index: torch.Tensor
    query_token_index: torch.Tensor
    query_member: torch.Tensor
    tokens_seen: int
    sequence_length: int


class _Reservoir:
    """The `size` items with the smallest random priorities among all items added so far."""

    def __init__(self, size: int):
        self.size = size
        self.priority = None
        self.items: dict[str, torch.Tensor] = {}

    def add(self, priority: torch.Tensor, items: dict[str, torch.Tensor], dim: dict[str, int]) -> None:
        """`priority` ``[t]``; each item tensor has its t entries along dimension `dim[name]`."""
        if self.priority is not None:
            priority = torch.cat([self.priority, priority])
            items = {name: torch.cat([self.items[name], tensor], dim=dim[name]) for name, tensor in items.items()}
        keep = priority.argsort()[: self.size].sort().values  # sorted: samples stay in stream order
        self.priority = priority[keep]
        self.items = {name: tensor.index_select(dim[name], keep.to(tensor.device)) for name, tensor in items.items()}


def _tap_attention(module, query, key, value, attention_mask, **kwargs):
    observe = getattr(_tap, "observe", None)
    attend = lambda q, k, v: sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)  # noqa: E731
    return attend(query, key, value) if observe is None else observe(_tap.layers, module.layer_idx, query, key, value, attend)


AttentionInterface.register(TAP_IMPLEMENTATION, _tap_attention)
AttentionMaskInterface.register(TAP_IMPLEMENTATION, sdpa_mask)


@contextmanager
def attention_tap(model, observe, probing: bool = False):
    """The one attention tap of calibration: within the block, each attention call of `model` runs
    ``observe(layers, layer_idx, query, key, value, attend)``, which returns what attention returns (``attend(q, k, v)``
    is the model's own sdpa attention) and may leave what it saw in ``layers``, the dict the block gets. With `probing`
    the model's parameters are frozen, so that a backward pass fills only the gradients of probes `observe` adds."""
    previous = model.config._attn_implementation
    frozen = [p for p in model.parameters() if p.requires_grad] if probing else []
    for parameter in frozen:
        parameter.requires_grad_(False)
    model.set_attn_implementation(TAP_IMPLEMENTATION)
    _tap.observe, _tap.layers = observe, {}
    try:
        yield _tap.layers
    finally:
        model.set_attn_implementation(previous)
        _tap.observe = _tap.layers = None
        for parameter in frozen:
            parameter.requires_grad_(True)


def _record(layers: dict, layer: int, query, key, value, attend):
    layers[layer] = (query.detach(), key.detach(), value.detach())
    return attend(query, key, value)


def recording_attention(model):
    """Within the block, every forward of `model` leaves each layer's (query, key, value) in the yielded dict."""
    return attention_tap(model, _record)


@torch.no_grad()
def collect_attention_samples(
    model,
    token_ids: torch.Tensor,
    samples: int = 4096,
    query_samples: int | None = None,
    sequence_length: int = SAMPLE_SEQUENCE,
    max_tokens: int | None = None,
    seed: int = 0,
) -> AttentionSamples:
    """Run `model` over `token_ids` (a 1-D stream, e.g. a tokenized corpus) in sequences of `sequence_length`
    tokens and sample its attention inputs."""
    query_samples = samples if query_samples is None else query_samples
    if samples <= 0 or query_samples <= 0 or sequence_length <= 1:
        raise ValueError("samples and query_samples must be positive and sequence_length at least 2.")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be one stream of tokens (1-D), got shape {tuple(token_ids.shape)}.")
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    if len(ids) < samples:
        raise ValueError(
            f"Too little calibration data: the text has {len(ids)} tokens but {samples} samples per head were asked "
            "for. Give more text (e.g. a larger corpus file) or ask for fewer samples (samples=...; --samples)."
        )
    generator = torch.Generator().manual_seed(seed)
    kv_reservoir, query_reservoir = _Reservoir(samples), _Reservoir(query_samples)
    starts = range(0, len(ids), sequence_length)
    with recording_attention(model) as recorded:
        for start in tqdm(starts, desc="collect", unit="seq"):
            chunk = ids[start : start + sequence_length]
            model(input_ids=chunk[None].to(model.device), use_cache=False)
            layers = [recorded[index] for index in sorted(recorded)]
            # kept on the device of the first layer (a model spread over GPUs records each layer on its own), in the model's dtype
            keys = torch.stack([key[0].to(model.device) for _, key, _ in layers])  # [layers, kv_heads, t, head_dim]
            values = torch.stack([value[0].to(model.device) for _, _, value in layers])
            queries = torch.stack([query[0].to(model.device) for query, _, _ in layers])  # [layers, heads, t, head_dim]
            length, kv_heads = keys.shape[2], keys.shape[1]
            groups = queries.shape[1] // kv_heads
            position = torch.arange(start, start + length)
            kv_reservoir.add(torch.rand(length, generator=generator), {"keys": keys, "values": values, "token_index": position}, {"keys": 2, "values": 2, "token_index": 0})
            # One stream item per (token, member of the group): [layers, kv_heads, t * groups, head_dim].
            grouped = queries.view(len(layers), kv_heads, groups, length, -1).transpose(2, 3).reshape(len(layers), kv_heads, length * groups, -1)
            query_reservoir.add(
                torch.rand(length * groups, generator=generator),
                {"queries": grouped, "query_token_index": position.repeat_interleave(groups), "query_member": torch.arange(groups).repeat(length)},
                {"queries": 2, "query_token_index": 0, "query_member": 0},
            )
            recorded.clear()
    return AttentionSamples(
        kv_reservoir.items["keys"], kv_reservoir.items["values"], query_reservoir.items["queries"], kv_reservoir.items["token_index"],
        query_reservoir.items["query_token_index"], query_reservoir.items["query_member"], len(ids), sequence_length,
    )

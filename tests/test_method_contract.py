"""The contract a method implements, exercised by tiny methods: what `compress_blocks` returns is what attention sees."""

import math
from dataclasses import replace

import torch
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache

from kvcompress import CompressedCache, CompressedLayer, Slots, cache_kwargs


class KeepEverything(CompressedLayer):
    def compress_blocks(self, blocks: Slots) -> Slots:
        return blocks


class StoreTwice(CompressedLayer):
    """Each token leaving the window is stored as two identical slots."""

    def compress_blocks(self, blocks: Slots) -> Slots:
        twice = lambda t: torch.cat([t, t], dim=2)  # noqa: E731
        return Slots(blocks.rows, twice(blocks.keys), twice(blocks.values), twice(blocks.token_ids))


class StoreOnceWithDoubleWeight(CompressedLayer):
    """Each token leaving the window is stored once with an attention-logit bias of log 2."""

    uses_bias = True

    def compress_blocks(self, blocks: Slots) -> Slots:
        return replace(blocks, bias=torch.full(blocks.token_ids.shape, math.log(2.0), device=blocks.keys.device))


def cache_of(layer_class):
    return type(f"{layer_class.__name__}Cache", (CompressedCache,), {"layer_class": layer_class})(sink=2, window=4, block_size=3)


def stream_logits(model, cache, ids):
    """Logits of a prompt forward and of 6 single-token steps."""
    logits = [model(input_ids=ids[:, :20], **cache_kwargs(cache)).logits]
    for position in range(20, 26):
        logits.append(model(input_ids=ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


def test_a_method_that_keeps_every_token_equals_dense():
    model, ids = tiny_model("llama"), prompt_ids(26)
    cache = cache_of(KeepEverything)
    assert torch.allclose(stream_logits(model, cache, ids), stream_logits(model, DynamicCache(), ids), atol=1e-5)
    assert cache.layers[0].store_length > 2  # tokens really went through the method into the store


def test_a_log2_slot_bias_weighs_a_slot_like_two_copies():
    model, ids = tiny_model("qwen3"), prompt_ids(26)
    duplicated, weighted = cache_of(StoreTwice), cache_of(StoreOnceWithDoubleWeight)
    reference = stream_logits(model, duplicated, ids)
    assert torch.allclose(stream_logits(model, weighted, ids), reference, atol=1e-5)
    assert not torch.allclose(stream_logits(model, cache_of(KeepEverything), ids), reference, atol=1e-3)  # the bias matters
    assert weighted.nbytes() < duplicated.nbytes()

"""The policy interface a method implements, exercised by small methods written against the public API only:
what a keep policy chooses and an encoding holds is what attention sees."""

import inspect
import math
import re
from dataclasses import replace

import pytest
import torch
from conftest import prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvcompress import CompressedCache, Encoding, KeepPolicy, LayerView, Slots, cache_kwargs
from kvcompress.slots import FILLER


class LowKeyNorm(KeepPolicy):
    """A new method in a few lines (Devoto et al. 2024, "A simple and effective L2 norm-based strategy for KV cache
    compression"): keys with a small norm draw the most attention, so each head keeps the `capacity` tokens with the
    smallest key norms among those that left the recent window."""

    keeps_scores = True  # the store keeps each slot's score, for `bound`

    def __init__(self, capacity: int):
        self.capacity = capacity

    def choose(self, layer: LayerView, blocks: Slots) -> Slots:
        return replace(blocks, scores=-blocks.keys.float().norm(dim=-1))  # higher is better

    def bound(self, layer: LayerView, token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ranked = scores.masked_fill(token_ids == FILLER, float("-inf"))
        return ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) < self.capacity


class StoreTwice(Encoding):
    """Each token leaving the window is stored as two identical slots."""

    def merge(self, layer: LayerView, blocks: Slots) -> Slots:
        twice = lambda t: torch.cat([t, t], dim=2)  # noqa: E731
        return Slots(blocks.rows, twice(blocks.keys), twice(blocks.values), twice(blocks.token_ids))


class StoreOnceWithDoubleWeight(Encoding):
    """Each token leaving the window is stored once with an attention-logit bias of log 2."""

    uses_bias = True

    def merge(self, layer: LayerView, blocks: Slots) -> Slots:
        return replace(blocks, bias=torch.full(blocks.token_ids.shape, math.log(2.0), device=blocks.keys.device))


def stream_logits(model, cache, ids, prompt=20):
    """Logits of a prompt forward and of single-token steps for the rest of `ids`."""
    logits = [model(input_ids=ids[:, :prompt], **cache_kwargs(cache)).logits]
    for position in range(prompt, ids.shape[1]):
        logits.append(model(input_ids=ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


SETTINGS = dict(sink=2, window=4, block_size=3)


def test_the_new_method_is_a_short_file_of_public_names():
    source = inspect.getsource(LowKeyNorm)
    assert len(source.splitlines()) < 40
    assert not re.search(r"\._\w", source)  # no private state of the engine or anything else


def test_the_default_policies_keep_every_token_exactly():
    model, ids = tiny_model("llama"), prompt_ids(26)
    cache = CompressedCache(**SETTINGS)
    assert torch.allclose(stream_logits(model, cache, ids), stream_logits(model, DynamicCache(), ids), atol=1e-5)
    assert cache.layers[0].store_length > 2  # tokens really went through the policies into the store


@settings(max_examples=6, deadline=None)
@given(length=st.integers(8, 40), block_size=st.integers(1, 5), window=st.integers(0, 6))
def test_a_capacity_above_the_sequence_equals_dense(length, block_size, window):
    model, ids = tiny_model("llama"), prompt_ids(length + 4)
    cache = CompressedCache(LowKeyNorm(capacity=length + 4), sink=2, window=window, block_size=block_size)
    assert torch.allclose(stream_logits(model, cache, ids, prompt=length), stream_logits(model, DynamicCache(), ids, prompt=length), atol=1e-5)


def test_the_new_method_holds_its_capacity_and_less_memory():
    model, ids = tiny_model("mistral"), prompt_ids(80)
    cache = CompressedCache(LowKeyNorm(capacity=8), **SETTINGS)
    logits = stream_logits(model, cache, ids, prompt=60)
    assert torch.isfinite(logits).all()
    for layer in cache.layers:
        assert int(layer.tokens_held().max()) <= 8 + SETTINGS["sink"] + SETTINGS["window"] + SETTINGS["block_size"]
        kept = layer.store["token_ids"]
        norms = layer.store["keys"].float().norm(dim=-1)
        assert bool((kept != FILLER).any())
        # the store holds the policy's scores beside the slots they rank
        assert bool((layer.store["scores"][kept != FILLER] == -norms[kept != FILLER]).all())
    assert cache.nbytes() < cache.dense_nbytes() / 2


def test_a_log2_slot_bias_weighs_a_slot_like_two_copies():
    model, ids = tiny_model("qwen3"), prompt_ids(26)
    duplicated, weighted = CompressedCache(encoding=StoreTwice(), **SETTINGS), CompressedCache(encoding=StoreOnceWithDoubleWeight(), **SETTINGS)
    reference = stream_logits(model, duplicated, ids)
    assert torch.allclose(stream_logits(model, weighted, ids), reference, atol=1e-5)
    assert not torch.allclose(stream_logits(model, CompressedCache(**SETTINGS), ids), reference, atol=1e-3)  # the bias matters
    assert weighted.nbytes() < duplicated.nbytes()


def test_policies_of_the_wrong_kind_are_refused():
    with pytest.raises(TypeError, match="keep= takes a kvcompress.policies.KeepPolicy instance, got StoreTwice"):
        CompressedCache(keep=StoreTwice())
    with pytest.raises(TypeError, match="keep= takes a kvcompress.policies.KeepPolicy instance, got str"):
        CompressedCache(keep="h2o")
    with pytest.raises(TypeError, match=r"encoding= takes an instance of a policy, not the class: encoding=StoreTwice\(\)"):
        CompressedCache(encoding=StoreTwice)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        CompressedCache(block_size=0)


def test_an_encoding_that_returns_biases_must_declare_them():
    class Undeclared(StoreOnceWithDoubleWeight):
        uses_bias = False

    model, ids = tiny_model("llama"), prompt_ids(26)
    with pytest.raises(RuntimeError, match="returned slot biases but does not set uses_bias"):
        stream_logits(model, CompressedCache(encoding=Undeclared(), **SETTINGS), ids)

"""Token budgets hold: a budgeted cache never holds more than its budget, refuses settings that cannot hold it, and at
ratio 1 loses nothing."""

import math

import pytest
import torch
from conftest import greedy, prompt_ids, tiny_model
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_gates import tiny_gates
from test_lowrank import fitted
from test_sidecar import untrained_sidecar
from transformers import DynamicCache

from kvcompress import GatedCache, H2OCache, PCACache, SidecarCache, StreamingLLMCache, cache_kwargs

CACHES = {"streamingllm": StreamingLLMCache, "h2o": H2OCache}


@pytest.mark.parametrize("cache_class", CACHES.values())
@pytest.mark.parametrize("budget, block_size", [(10, 16), (64, 128), (12, 9)])
def test_a_block_that_cannot_fit_the_budget_is_refused(cache_class, budget, block_size):
    with pytest.raises(ValueError, match=rf"block_size \({block_size}\) is too large for a budget of {budget} tokens"):
        cache_class(budget=budget, block_size=block_size)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(CACHES)), budget=st.integers(6, 40), block_size=st.integers(1, 8), sink=st.integers(0, 4), length=st.integers(20, 90))
def test_held_tokens_never_exceed_the_budget(name, budget, block_size, sink, length):
    if sink + block_size > budget:
        return
    model, ids = tiny_model("llama"), prompt_ids(length)
    cache = CACHES[name](budget=budget, block_size=block_size, sink=sink)
    with torch.no_grad():
        model(input_ids=ids[:, : length // 2], **cache_kwargs(cache))
        for position in range(length // 2, length):
            model(input_ids=ids[:, position : position + 1], **cache_kwargs(cache))
            assert max(int(layer.tokens_held().max()) for layer in cache.layers) <= budget


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(CACHES)), ratio=st.floats(1.5, 16), block_size=st.integers(1, 8), sink=st.integers(0, 4), length=st.integers(8, 60))
@example(name="streamingllm", ratio=8.0, block_size=5, sink=0, length=20)  # held 4 tokens where ceil(24 / 8) = 3 once
def test_a_ratio_holds_ceil_seen_over_ratio_or_the_sink_and_one_blocks_slack(name, ratio, block_size, sink, length):
    """A block leaves only when whole, so a ratio's budget never goes below sink + block_size - 1 (`Budget.at`); above that it is met."""
    model, ids = tiny_model("llama"), prompt_ids(length + 12)
    cache = CACHES[name](ratio=ratio, block_size=block_size, sink=sink)
    with torch.no_grad():
        model(input_ids=ids[:, :length], **cache_kwargs(cache))
        for position in range(length, length + 12):
            model(input_ids=ids[:, position : position + 1], **cache_kwargs(cache))
            for layer in cache.layers:
                seen = int(layer.seen[0])
                assert int(layer.tokens_held().max()) <= max(math.ceil(seen / ratio), sink + block_size - 1)


@pytest.mark.parametrize("recent_share", [0.0, 1.0])
def test_a_budget_of_one_token_without_a_sink_runs(recent_share):
    """With no window the token leaving is the newest one: nothing moves into its slot (the slot once overlapped itself)."""
    model, ids = tiny_model("llama"), prompt_ids(20)
    cache = H2OCache(budget=1, sink=0, block_size=1, recent_share=recent_share)
    greedy(model, cache, ids, new_tokens=8)
    assert all(int(layer.tokens_held().max()) <= 1 for layer in cache.layers)


@pytest.mark.parametrize("cache_class", CACHES.values())
@pytest.mark.parametrize("block_size", [1, 4])
def test_ratio_one_loses_nothing(cache_class, block_size):
    model, ids = tiny_model("qwen3"), prompt_ids(60)
    assert torch.equal(greedy(model, cache_class(ratio=1, block_size=block_size), ids), greedy(model, DynamicCache(), ids))


@pytest.fixture(scope="module")
def learned():
    """A tiny Llama and a gate, a PCA (rank 6 of 16) and an untrained sidecar artifact fitted for it."""
    model = tiny_model("llama")
    return model, {GatedCache: tiny_gates(model), PCACache: fitted(model, 6), SidecarCache: untrained_sidecar(model)}


@pytest.mark.parametrize("cache_class", [GatedCache, PCACache, SidecarCache])
def test_ratio_one_of_a_learned_cache_loses_nothing(learned, cache_class):
    """Ratio 1 asks for no compression: the gates keep every token, low rank and merging keep every token exact."""
    model, artifacts = learned
    ids = prompt_ids(60)
    assert torch.equal(greedy(model, cache_class(artifacts[cache_class], ratio=1), ids), greedy(model, DynamicCache(), ids))


@pytest.mark.parametrize("cache_class", [GatedCache, PCACache, SidecarCache])
@pytest.mark.parametrize("context", [True, 0, 2.5, "4096"])
def test_a_context_that_is_not_a_token_count_is_refused(learned, cache_class, context):
    with pytest.raises(ValueError, match=rf"context must be the context length in tokens at which ratio= is met .*got {context!r}"):
        cache_class(learned[1][cache_class], ratio=2, context=context)


@pytest.mark.parametrize("cache_class", CACHES.values())
def test_one_kv_head_evicts_in_place(cache_class):
    """With one row and one KV head the tail's last slot is a contiguous view of the buffer it is scattered into (once refused by torch)."""
    model = tiny_model("llama", num_key_value_heads=1)
    greedy(model, cache_class(budget=16), prompt_ids(40), new_tokens=8)

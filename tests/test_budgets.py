"""Token budgets hold: a budgeted cache never holds more than its budget, refuses settings that cannot hold it, and at
ratio 1 loses nothing."""

import pytest
import torch
from conftest import greedy, prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvcompress import H2OCache, StreamingLLMCache, cache_kwargs

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


@pytest.mark.parametrize("cache_class", CACHES.values())
@pytest.mark.parametrize("block_size", [1, 4])
def test_ratio_one_loses_nothing(cache_class, block_size):
    model, ids = tiny_model("qwen3"), prompt_ids(60)
    assert torch.equal(greedy(model, cache_class(ratio=1, block_size=block_size), ids), greedy(model, DynamicCache(), ids))

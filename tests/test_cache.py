"""Mechanics of the shared compressed-cache core and the baselines, on tiny random models."""

import pytest
import torch
from conftest import ARCHITECTURES, assert_layers_equal, greedy, prompt_ids, tiny_model, watch_hand_one
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvcompress import H2OCache, StreamingLLMCache, cache_kwargs

CACHES = {
    "streamingllm": lambda budget: StreamingLLMCache(budget=budget),
    "h2o": lambda budget: H2OCache(budget=budget),
    "h2o-block4": lambda budget: H2OCache(budget=budget, block_size=4),
}


@pytest.mark.parametrize("chunk", [None, 8], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_matches_dense_when_budget_covers_the_sequence(arch, cache, chunk):
    model = tiny_model(arch)
    ids = prompt_ids(24)
    dense = greedy(model, DynamicCache(), ids, prefill_chunk_size=chunk)
    compressed = CACHES[cache](24 + 32)
    assert torch.equal(greedy(model, compressed, ids, prefill_chunk_size=chunk), dense)
    assert compressed.get_seq_length() == 24 + 32 - 1  # positions: every token seen, the last one not fed back


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_matches_dense_under_eager_attention(cache):
    model = tiny_model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "kvcompress_eager"
    ids = prompt_ids(24)
    assert torch.equal(greedy(model, CACHES[cache](64), ids), greedy(model, DynamicCache(), ids))


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_memory_shrinks_to_the_budget(cache):
    model = tiny_model("llama")
    compressed = CACHES[cache](16)
    greedy(model, compressed, prompt_ids(48), new_tokens=32)
    seen = 48 + 32 - 1
    for layer in compressed.layers:
        held = layer.tokens_held()
        assert int(held.max()) <= 16 and int(held.min()) >= 16 - 3  # block-wise eviction may leave up to 3 slots free
        assert layer.table_token_ids().shape[2] == int(held.max())  # no dead slots are kept
    assert compressed.dense_nbytes() == 2 * 2 * 2 * seen * 16 * 4  # K+V, layers, KV heads, tokens, head_dim, fp32
    # Held: the budget and room for the next block of new tokens (the table holds them during attention); bookkeeping under 10%.
    assert compressed.compression_ratio > 0.9 * seen / (16 + compressed.layers[0].block_size)


@pytest.mark.parametrize("cache_class", [StreamingLLMCache, H2OCache])
def test_ratio_budget_tracks_tokens_seen(cache_class):
    model = tiny_model("llama")
    compressed = cache_class(ratio=4)
    greedy(model, compressed, prompt_ids(60), new_tokens=40)
    seen = 60 + 40 - 1
    assert int(compressed.layers[0].tokens_held().max()) == -(-seen // 4)
    assert 3.5 < compressed.compression_ratio < 4.2


def test_chunked_prefill_bounds_attention_span_and_memory():
    model = tiny_model("llama")
    spans = {}
    for chunk in (None, 8):
        cache = StreamingLLMCache(budget=16)
        seen_lengths = []
        original = cache.update

        def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            seen_lengths.append(keys.shape[2])
            return keys, values

        cache.update = recording_update
        greedy(model, cache, prompt_ids(64), new_tokens=4, prefill_chunk_size=chunk)
        spans[chunk] = max(seen_lengths)
    assert spans[None] == 64  # the whole prompt attends exactly, then is compressed
    assert spans[8] <= 16 + 8  # chunked: never more than the budget plus one chunk


@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_left_padded_batch_equals_each_row_alone(arch, cache):
    model = tiny_model(arch)
    ids = prompt_ids(30, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    batched = greedy(model, CACHES[cache](12), ids, mask)
    assert torch.equal(batched[0], greedy(model, CACHES[cache](12), ids[:1])[0])
    assert torch.equal(batched[1], greedy(model, CACHES[cache](12), ids[1:, 7:])[0])


def test_unpadded_batch_equals_each_row_alone():
    model = tiny_model("qwen2")
    ids = prompt_ids(30, batch=3)
    batched = greedy(model, H2OCache(budget=12), ids)
    for row in range(3):
        assert torch.equal(batched[row], greedy(model, H2OCache(budget=12), ids[row : row + 1])[0])


def test_reset_makes_a_used_cache_behave_like_a_fresh_one():
    model = tiny_model("llama")
    ids = prompt_ids(40)
    cache = H2OCache(budget=16)
    first = greedy(model, cache, ids)
    assert cache.get_seq_length() > 0 and cache.nbytes() > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    assert torch.equal(greedy(model, cache, ids), first)
    assert torch.equal(greedy(model, H2OCache(budget=16), ids), first)


def test_sampling_with_several_return_sequences_matches_dense():
    model = tiny_model("llama")
    ids = prompt_ids(20)
    outputs = []
    for cache in (DynamicCache(), StreamingLLMCache(budget=64)):
        torch.manual_seed(3)
        out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=16, do_sample=True, num_return_sequences=3, pad_token_id=0)
        outputs.append(out)
    assert outputs[0].shape[0] == 3
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_cache_follows_the_model_dtype(cache):
    model = tiny_model("qwen2").to(torch.bfloat16)
    compressed = CACHES[cache](16)
    out = greedy(model, compressed, prompt_ids(40), new_tokens=8)
    assert out.shape == (1, 8)
    assert all(layer.tail["keys"].dtype == torch.bfloat16 and layer.tail["values"].dtype == torch.bfloat16 for layer in compressed.layers)
    assert compressed.dense_nbytes() == 2 * 2 * 2 * (40 + 8 - 1) * 16 * 2  # bf16: 2 bytes per element


@pytest.mark.parametrize("block_size", [1, 4])
def test_streamingllm_holds_exactly_each_rows_sink_and_most_recent_tokens(block_size):
    model = tiny_model("llama")
    ids = prompt_ids(40, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    cache = StreamingLLMCache(budget=16, sink=4, block_size=block_size)
    greedy(model, cache, ids, mask, new_tokens=20, prefill_chunk_size=8)
    for layer in cache.layers:
        for row, seen in enumerate((40 + 20 - 1, 31 + 20 - 1)):
            assert int(layer.seen[row]) == seen
            for head in range(layer.tail["keys"].shape[1]):
                held = sorted(int(t) for t in layer.table_token_ids()[row, head] if t >= 0)
                recent = held[4:]
                assert held[:4] == [0, 1, 2, 3]
                assert recent == list(range(seen - len(recent), seen))  # the newest tokens, none missing
                assert 16 - (block_size - 1) <= len(held) <= 16


def test_query_chunking_of_the_slot_mask_attention_changes_nothing(monkeypatch):
    from kvcompress import attention

    model = tiny_model("qwen2")
    ids = prompt_ids(48, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    whole_cache = H2OCache(budget=20)
    whole = greedy(model, whole_cache, ids, mask)
    monkeypatch.setattr(attention, "SCORES_PER_CHUNK", 2 * 4 * 48 * 7)  # 7 queries per chunk in the prefill
    chunked_cache = H2OCache(budget=20)
    assert torch.equal(greedy(model, chunked_cache, ids, mask), whole)
    for a, b in zip(whole_cache.layers, chunked_cache.layers):
        assert torch.equal(a.table_token_ids(), b.table_token_ids())
        for part in ("store", "tail"):
            assert torch.allclose(getattr(a, part)["scores"], getattr(b, part)["scores"], atol=1e-5)


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_a_second_generate_call_continues_the_cache_like_dense(cache):
    model = tiny_model("llama")
    first_turn, second_turn = prompt_ids(20), prompt_ids(10, seed=2)
    outputs = []
    for kv in (DynamicCache(), CACHES[cache](128)):
        reply = greedy(model, kv, first_turn, new_tokens=12)
        history = torch.cat([first_turn, reply, second_turn], dim=1)  # the next turn: whole conversation, cache reused
        outputs.append(greedy(model, kv, history, new_tokens=12))
        assert kv.get_seq_length() == history.shape[1] + 12 - 1
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_a_cache_used_again_for_a_shorter_prompt_says_to_reset_it(cache):
    """transformers gives the model only the input beyond what the cache holds: for a shorter prompt, nothing (it failed
    deep in the model with a reshape error). After reset() the cache generates what a new one does."""
    model = tiny_model("llama")
    used, short = CACHES[cache](128), prompt_ids(10, seed=2)
    greedy(model, used, prompt_ids(40), new_tokens=4)
    with pytest.raises(ValueError, match="no token beyond the 43 this cache already holds.*pass a new cache or call cache.reset"):
        greedy(model, used, short, new_tokens=4)
    used.reset()
    assert torch.equal(greedy(model, used, short, new_tokens=4), greedy(model, CACHES[cache](128), short, new_tokens=4))


def test_per_token_eviction_works_in_place():
    model = tiny_model("llama")
    cache = StreamingLLMCache(budget=16)
    token = model(input_ids=prompt_ids(40), **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    buffers = set()
    for _ in range(20):
        token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        layer = cache.layers[0]
        assert layer.tail_length == 16 and layer.tail_capacity() == 17  # the budget and room for the next token
        buffers.add(layer.tail_buffers["keys"].data_ptr())
    assert len(buffers) == 1  # the same buffer every step: nothing is reallocated or copied whole


def test_a_tail_nothing_leaves_is_reallocated_once_per_32_tokens():
    """A cache that has not compressed yet (the core's case at short context) appends into room, not into a fresh copy."""
    from kvcompress.slots import TAIL_ROOM

    model = tiny_model("llama")
    cache = StreamingLLMCache(budget=1000)
    token = model(input_ids=prompt_ids(4 * TAIL_ROOM), **cache_kwargs(cache)).logits[:, -1:].argmax(-1)  # long enough for the whole room
    buffers = []
    for _ in range(3 * TAIL_ROOM):
        token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        buffers.append(cache.layers[0].tail_buffers["keys"].data_ptr())
    assert sum(a != b for a, b in zip(buffers, buffers[1:])) <= 3  # at most one new buffer per TAIL_ROOM tokens


@settings(max_examples=20, deadline=None)
@given(prompt=st.integers(1, 90), new=st.integers(0, 24))
@example(prompt=1, new=3)  # 4 tokens in 5 slots: 1.25x exactly, where the per-row counters tip a bound that leaves them out
def test_a_short_prompt_is_held_in_at_most_a_quarter_more_slots_than_its_tokens(prompt, new):
    """Until tokens leave it, the tail's room is a quarter of its length, up to `TAIL_ROOM` (1/32 past 1,024 tokens): a
    short chat message is not held in a buffer twice its length, which `nbytes` would count against dense."""
    from kvcompress.slots import STORE_ROOM, TAIL_ROOM

    model = tiny_model("llama")
    cache = StreamingLLMCache(budget=1000)
    ids = prompt_ids(prompt + new)
    model(input_ids=ids[:, :prompt], **cache_kwargs(cache))
    for step in range(prompt, prompt + new):
        model(input_ids=ids[:, step : step + 1], **cache_kwargs(cache))
    layer, tokens = cache.layers[0], prompt + new
    assert layer.tail_length == tokens and not layer.has_handed
    assert tokens <= layer.tail_capacity() <= tokens + max(tokens // STORE_ROOM, min(TAIL_ROOM, tokens // 4))
    counters = sum(each.seen.untyped_storage().nbytes() + each.handed.untyped_storage().nbytes() for each in cache.layers)  # per row, not per slot
    assert cache.nbytes() - counters <= 1.26 * cache.dense_nbytes() * (1 + 4 / (2 * model.config.head_dim * 4))  # + an int32 id a slot


@pytest.mark.parametrize("cache_class", [StreamingLLMCache, H2OCache])
def test_the_room_a_growing_tail_got_is_not_kept_once_tokens_leave(cache_class):
    """A prompt shorter than the budget: the tail grows (with room) until the first token leaves, then holds its window and
    room for a block only, as `nbytes` and the compression ratio count it."""
    model = tiny_model("llama")
    cache = cache_class(budget=64)
    greedy(model, cache, prompt_ids(20), new_tokens=100)
    layer = cache.layers[0]
    assert layer.has_handed and layer.tail_capacity() <= layer.tail_length + max(layer.block_size, layer.tail_length // 32)


def test_place_keeps_slots_where_they_are_and_moves_only_the_rest():
    from kvcompress.slots import place as _place

    ids = torch.tensor([[[0, 1, 2, 3, 4, 5]]], dtype=torch.int32)
    buffers = {"token_ids": ids.clone(), "keys": ids.float()[..., None].clone()}
    keep = torch.tensor([[[True, False, True, False, True, True]]])
    new = {"token_ids": torch.tensor([[[9]]], dtype=torch.int32), "keys": torch.tensor([[[[9.0]]]])}
    buffers, length = _place(buffers, 6, keep, new, torch.tensor([[[True]]]))
    assert length == 5
    assert buffers["token_ids"][0, 0, :5].tolist() == [0, 5, 2, 9, 4]  # 0, 2, 4 stay; 5 and the new 9 fill the gaps
    assert buffers["keys"][0, 0, :5, 0].tolist() == [0.0, 5.0, 2.0, 9.0, 4.0]


@pytest.mark.parametrize("cache_class", [StreamingLLMCache, H2OCache])
@pytest.mark.parametrize("budget", [dict(budget=24), dict(ratio=3)])
def test_per_token_eviction_in_place_equals_the_general_path(monkeypatch, cache_class, budget):
    from kvcompress.cache import CompressedLayer

    model = tiny_model("llama", max_position_embeddings=512)
    ids = prompt_ids(400, batch=2)  # at 3:1 H2O's store (over 64 slots) has room (1/32) to take a slot in place as the budget grows
    ran = watch_hand_one(monkeypatch)
    quick = cache_class(**budget)
    quick_tokens = greedy(model, quick, ids, new_tokens=30)
    assert sum(took for took, _ in ran) > 20  # the usual per-token step took the in-place path
    assert (cache_class is H2OCache and "ratio" in budget) == any(took and grew for took, grew in ran)
    monkeypatch.setattr(CompressedLayer, "_hand_one_in_place", lambda self: False)
    general = cache_class(**budget)
    assert torch.equal(greedy(model, general, ids, new_tokens=30), quick_tokens)
    assert_layers_equal(quick, general)


def test_attention_reads_a_plain_store_and_the_tail_without_a_copy():
    model = tiny_model("llama")
    cache = H2OCache(ratio=4, block_size=4)
    greedy(model, cache, prompt_ids(300), new_tokens=40)
    layer = cache.layers[0]
    storages = {layer.store_buffers[name].untyped_storage().data_ptr() for name in ("keys", "values")}
    keys, values = layer.update(torch.zeros_like(layer.tail["keys"][:, :, :1]), torch.zeros_like(layer.tail["values"][:, :, :1]))
    assert {keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr()} == storages  # views of the cache's buffers
    assert keys.shape[2] == layer.store_capacity() + layer.tail_length  # [store with its room | tail]
    assert layer.store_length < layer.store_capacity() <= layer.store_length * 1.07  # room to grow, a few percent
    assert (layer.table_token_ids()[..., layer.store_length : layer.store_capacity()] == -1).all()  # the room is masked out


def test_h2o_without_room_for_heavy_hitters_is_streamingllm():
    """A budget that leaves heavy hitters no room (short prompts at a ratio, or recent_share=1) keeps only sink and window."""
    model = tiny_model()
    assert greedy(model, H2OCache(ratio=8), prompt_ids(6), new_tokens=8).shape == (1, 8)  # the README's example on a short prompt
    ids = prompt_ids(100)
    assert torch.equal(greedy(model, H2OCache(budget=24, recent_share=1.0), ids, new_tokens=16), greedy(model, StreamingLLMCache(budget=24), ids, new_tokens=16))

"""ComposedCache (gates x low rank x int8/int4) and its quantization, on tiny random models: each part
alone equals its own cache, the parts multiply the memory saving, quantization error shrinks with bits."""

import pytest
import torch
from conftest import assert_left_padded_batch_matches_rows, greedy, prompt_ids, tiny_model
from test_gates import tiny_gates
from test_lowrank import fitted, stream_logits
from transformers import DynamicCache

from kvcompress import ComposedCache, GatedCache, PCACache
from kvcompress.lowrank import LowRankCompressor, PCACompressor
from kvcompress.quantize import dequantize, quantize
from kvcompress.slots import FILLER, STORE_ROOM


@pytest.fixture(scope="module")
def parts():
    model = tiny_model("llama")
    return model, tiny_gates(model), fitted(model, 16), fitted(model, 4, 6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_round_trip_is_within_half_a_step_and_packs_int4_two_a_byte(bits):
    x = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 40)
    packed = quantize(x, bits, group_size=16)
    assert packed["q"].shape == (2, 3, 5, 48 * bits // 8) and packed["scale"].shape == (2, 3, 5, 3)
    assert packed["q"].dtype == (torch.int8 if bits == 8 else torch.uint8) and packed["scale"].dtype == torch.float16
    restored = dequantize(packed, 40, torch.float32)
    step = torch.nn.functional.pad(packed["scale"].float(), (0, 0)).repeat_interleave(16, -1)[..., :40]
    assert bool(((restored - x).abs() <= step * 0.5 + 1e-3 * x.abs() + 1e-6).all())
    assert float((restored - x).norm() / x.norm()) < (0.01 if bits == 8 else 0.12)
    assert torch.equal(dequantize(quantize(torch.zeros(1, 1, 2, 8), bits, 8), 8, torch.float32), torch.zeros(1, 1, 2, 8))


def test_each_part_alone_is_its_own_cache(parts):
    model, gates, full_rank, _ = parts
    ids = prompt_ids(48)
    for policy in ("head", "layer"):
        assert torch.equal(greedy(model, ComposedCache(gates, keep_ratio=0.3, policy=policy, bits=None), ids), greedy(model, GatedCache(gates, 0.3, policy=policy), ids))
    assert torch.allclose(stream_logits(model, ComposedCache(lowrank=full_rank, bits=None), ids), stream_logits(model, PCACache(full_rank), ids), atol=1e-5)


def test_per_head_gates_with_full_rank_latents_attend_like_the_gates_alone(parts):
    """Per-head gating leaves each head its own slots, so latents are stored per head and un-rotated at each head's positions."""
    model, gates, full_rank, _ = parts
    ids = prompt_ids(60)
    composed, gated = ComposedCache(gates, full_rank, keep_ratio=0.3, bits=None), GatedCache(gates, 0.3)
    assert torch.allclose(stream_logits(model, composed, ids), stream_logits(model, gated, ids), atol=1e-4)
    layer = composed.layers[1]
    assert layer.store["key_latents"].shape[1] == 2  # [B, heads, slots, rank]
    held = [sorted(int(t) for t in layer.store["token_ids"][0, head] if t != FILLER) for head in range(2)]
    assert held[0] != held[1]


def test_quantization_error_shrinks_with_bits_and_full_rank_int8_stays_close_to_dense(parts):
    model, _, full_rank, _ = parts
    ids = prompt_ids(60)
    dense = stream_logits(model, DynamicCache(), ids)
    errors = {bits: float((stream_logits(model, ComposedCache(lowrank=full_rank, bits=bits), ids) - dense).abs().max()) for bits in (4, 8)}
    assert 0 < errors[8] < errors[4] and errors[8] < 0.05 * float(dense.abs().max())


def test_the_savings_multiply_and_the_bytes_are_the_quantized_store(parts):
    model, gates, _, low_rank = parts
    ids = prompt_ids(80)
    held = {}
    for name, cache in {
        "gates": GatedCache(gates, 0.3, policy="layer"),
        "gates x low rank": ComposedCache(gates, low_rank, keep_ratio=0.3, policy="layer", bits=None),
        "gates x low rank x int4": ComposedCache(gates, low_rank, keep_ratio=0.3, policy="layer", bits=4, group_size=8),
    }.items():
        greedy(model, cache, ids, new_tokens=24)
        held[name] = cache.nbytes()
    assert held["gates x low rank x int4"] < held["gates x low rank"] < held["gates"]
    layer = cache.layers[0]
    stored, tail = layer.store_capacity(), layer.tail_capacity()  # the slots and the room to grow
    assert layer.store_length <= stored <= layer.store_length * (1 + 1 / STORE_ROOM)
    # int4 latents (keys: 2 heads x 4 dims -> 1 group of 8; values: 2 x 6 = 12 dims -> 2 groups) with float16 scales,
    # int32 token ids and float32 gate probabilities per slot and head, then the exact tail with room for the next block,
    # and the row's two int64 counters (tokens seen, tokens handed to the policies).
    quantized = stored * (8 // 2 + 16 // 2) + stored * (1 + 2) * 2
    assert layer.nbytes() == quantized + stored * 2 * (4 + 4) + tail * 2 * (16 + 16 + 1) * 4 + 2 * 8
    assert {name for name, t in layer.store.items() if t is not None} == {"token_ids", "scores", "key_latents.q", "key_latents.scale", "value_latents.q", "value_latents.scale"}


def test_int8_alone_keeps_every_token_in_a_third_of_the_float32_bytes():
    model = tiny_model("qwen2")
    cache = ComposedCache(bits=8, group_size=16, sink=4, window=8, block_size=4)
    greedy(model, cache, prompt_ids(64), new_tokens=16)
    layer = cache.layers[0]
    assert int(layer.tokens_held().min()) == 64 + 15
    stored, heads = layer.store_capacity(), layer.store["token_ids"].shape[1]  # the slots and the room to grow
    # per slot and head: int8 keys and values (16 bytes each) with one float16 scale each, and an int32 token id; the row's two int64 counters
    assert layer.store["keys.q"].dtype == torch.int8
    assert layer.nbytes() == stored * heads * (2 * (16 + 2) + 4) + layer.tail_capacity() * heads * (2 * 16 + 1) * 4 + 2 * 8
    assert stored * heads * (2 * (16 + 2) + 4) < 0.33 * stored * heads * 2 * 16 * 4  # the stored tokens in a third of their float32 bytes


def test_a_left_padded_batch_matches_each_row_alone(parts):
    model, gates, _, low_rank = parts
    assert_left_padded_batch_matches_rows(model, lambda: ComposedCache(gates, low_rank, keep_ratio=0.3, bits=4, group_size=8), length=40, padding=6, new_tokens=16)


def test_loads_from_directories_and_refuses_bad_settings(parts, tmp_path):
    model, gates, _, low_rank = parts
    gates.save_pretrained(tmp_path / "gate")
    low_rank.save_pretrained(tmp_path / "pca")
    assert isinstance(LowRankCompressor.from_pretrained(tmp_path / "pca"), PCACompressor)  # the family class loads the artifact's method
    loaded = ComposedCache.from_pretrained(gate=tmp_path / "gate", lowrank=tmp_path / "pca", keep_ratio=0.3, bits=4, group_size=8)
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, loaded, ids), greedy(model, ComposedCache(gates, low_rank, keep_ratio=0.3, bits=4, group_size=8), ids))
    assert loaded.settings.window == 8  # the artifacts' cache settings
    with pytest.raises(ValueError, match="needs at least one of gate, lowrank or bits"):
        ComposedCache(bits=None)
    with pytest.raises(ValueError, match="bits must be one of 4, 8"):
        ComposedCache(lowrank=low_rank, bits=3)
    with pytest.raises(ValueError, match="group_size must be an even integer"):
        ComposedCache(lowrank=low_rank, group_size=7)
    with pytest.raises(TypeError, match="lowrank must be a PCA or KVSplice compressor, got GateCompressor"):
        ComposedCache(lowrank=gates)
    with pytest.raises(TypeError, match="Gating needs a GateCompressor, got PCACompressor"):
        ComposedCache(gate=low_rank)
    other = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="fitted for tiny .* 2 KV heads of dim 16.* has 4 KV heads"):
        greedy(other, ComposedCache(gates, low_rank, keep_ratio=0.3), prompt_ids(20), new_tokens=2)


@pytest.mark.parametrize("setting", [{"max_tokens": 5}, {"policy": "layer"}, {"allocation": "equal"}, {"keep_ratio": 0.5}])
def test_the_gates_settings_without_a_gate_are_refused(setting):
    """Without a gate every token is kept: a gate's setting would be silently ignored."""
    with pytest.raises(ValueError, match=f"{next(iter(setting))} choose what a gate keeps; ComposedCache without a gate keeps every token"):
        ComposedCache(bits=8, **setting)

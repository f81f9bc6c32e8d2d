"""Collection samples exactly what the frozen model's attention sees, uniformly, within a memory bound."""

import pytest
import torch
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvcompress import cache_kwargs
from kvcompress.calibration.collect import collect_attention_samples


def _dense_states(model, sequence):
    """Post-RoPE keys/values per layer from a DynamicCache, and post-RoPE queries recomputed from each layer's input."""
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda module, args, kwargs, out, index=index: inputs.__setitem__(index, (kwargs["hidden_states"], kwargs["position_embeddings"])),
            with_kwargs=True,
        )
        for index, layer in enumerate(model.model.layers)
    ]
    cache = DynamicCache()
    model(input_ids=sequence[None], **cache_kwargs(cache))
    for hook in hooks:
        hook.remove()
    queries = []
    for index, layer in enumerate(model.model.layers):
        hidden, (cos, sin) = inputs[index]
        attention = layer.self_attn
        q = attention.q_proj(hidden).view(1, hidden.shape[1], -1, attention.head_dim).transpose(1, 2)
        queries.append(apply_rotary_pos_emb(q, q, cos, sin)[0][0])
    return [layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers], queries


def test_samples_are_the_models_post_rope_keys_values_and_queries():
    model = tiny_model("llama")
    stream = prompt_ids(100)[0]
    samples = collect_attention_samples(model, stream, samples=30, query_samples=50, sequence_length=40)
    assert samples.keys.shape == (2, 2, 30, 16) and samples.queries.shape == (2, 2, 50, 16)
    assert samples.tokens_seen == 100
    dense = {start: _dense_states(model, stream[start : start + 40]) for start in (0, 40, 80)}
    for i, token in enumerate(samples.token_index.tolist()):
        keys, values, _ = dense[token // 40 * 40]
        for layer in range(2):
            assert torch.allclose(samples.keys[layer, :, i], keys[layer][:, token % 40], atol=1e-5)
            assert torch.allclose(samples.values[layer, :, i], values[layer][:, token % 40], atol=1e-5)
    for i, (token, member) in enumerate(zip(samples.query_token_index.tolist(), samples.query_member.tolist())):
        _, _, queries = dense[token // 40 * 40]
        for layer in range(2):
            for kv_head in range(2):  # query head kv_head * groups + member belongs to this KV head
                assert torch.allclose(samples.queries[layer, kv_head, i], queries[layer][kv_head * 2 + member, token % 40], atol=1e-5)


def test_everything_is_kept_when_it_fits_and_the_attention_implementation_is_restored():
    model = tiny_model("qwen3")
    samples = collect_attention_samples(model, prompt_ids(50)[0], samples=50, query_samples=100, sequence_length=16)
    assert samples.token_index.tolist() == list(range(50))
    assert len(samples.query_token_index) == 50 * 2  # 2 query heads per KV head
    assert model.config._attn_implementation == "kvcompress_sdpa"


def test_the_sample_is_uniform_over_the_stream():
    model = tiny_model("llama")
    stream = torch.randint(3, 128, (2000,))
    samples = collect_attention_samples(model, stream, samples=200, sequence_length=100, seed=3)
    assert len(set(samples.token_index.tolist())) == 200
    assert 0.4 < (samples.token_index < 1000).float().mean() < 0.6  # as many from the first half as from the second
    assert len(set((samples.token_index // 100).tolist())) == 20  # every sequence contributes


def test_too_little_calibration_data_is_refused():
    with pytest.raises(ValueError, match="Too little calibration data"):
        collect_attention_samples(tiny_model(), prompt_ids(50)[0], samples=100)


def test_the_attention_implementation_is_restored_after_a_failure(monkeypatch):
    model = tiny_model("llama")

    def fails(*args, **kwargs):  # a token id beyond the vocabulary raises on the CPU, but is a device-side assert on a GPU
        raise IndexError("index out of range in self")

    monkeypatch.setattr(model.model.embed_tokens, "forward", fails)
    with pytest.raises(IndexError):
        collect_attention_samples(model, torch.tensor([5, 6, 7, 8]), samples=2)
    assert model.config._attn_implementation == "kvcompress_sdpa"

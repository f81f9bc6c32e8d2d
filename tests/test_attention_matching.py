"""Closed-form attention matching: exact when nothing is merged; on the default model's real keys,
values and queries, closer to dense attention than keeping the same keys alone or pooling them."""

import math

import pytest
import torch

from kvcompress.attention_matching import attention_matching_merge, window_mass_and_output


def _random_heads(windows=6, heads=3, length=32, dim=16, queries=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(windows, heads, length, dim, generator=g) * (0.5 + torch.rand(windows, heads, length, 1, generator=g) * 2)
    values = torch.randn(windows, heads, length, dim, generator=g)
    all_queries = torch.randn(1, heads, 2 * queries, dim, generator=g) * 1.5
    return keys, values, all_queries[:, :, :queries], all_queries[:, :, queries:]


def test_keeping_every_slot_reproduces_the_window_for_any_query():
    keys, values, reference, held_out = _random_heads()
    merged = attention_matching_merge(keys, values, reference, slots=keys.shape[-2])
    for queries in (reference, held_out):
        mass, output = window_mass_and_output(queries, keys, values)
        merged_mass, merged_output = window_mass_and_output(queries, merged.keys, merged.values, merged.bias)
        assert torch.allclose(merged_mass, mass, atol=1e-3) and torch.allclose(merged_output, output, atol=1e-3)


def test_asking_for_more_slots_than_tokens_is_refused():
    keys, values, reference, _ = _random_heads(length=8)
    with pytest.raises(ValueError, match="slots must be between 1 and the window length 8"):
        attention_matching_merge(keys, values, reference, slots=9)


@pytest.mark.model
def test_on_the_default_model_merged_windows_beat_kept_keys_and_pooling(default_model):
    """8 windows of 32 tokens (positions 256-511) merged 8:1; later queries (580-639) attend over exact
    tokens before and after them. Reference queries are the ones at 520-579."""
    from kvcompress.calibration.collect import recording_attention
    from kvcompress.corpus import load_text, split_text

    model, tokenizer = default_model
    ids = torch.tensor([tokenizer(split_text(load_text())[0]).input_ids[:640]])
    with torch.no_grad(), recording_attention(model) as recorded:
        model(input_ids=ids.to(model.device), use_cache=False)
        layers = {layer: [t[0].float().cpu() for t in recorded[layer]] for layer in (3, 10, 17, 24, 29)}
    errors = {"attention matching": [], "kept keys": [], "mean pooling, log-count bias": []}
    for queries, keys, values in layers.values():
        heads, dim = keys.shape[0], keys.shape[-1]
        grouped = queries.view(heads, -1, queries.shape[1], dim)
        windows = lambda t: t[:, 256:512].reshape(heads, 8, 32, dim).transpose(0, 1)  # noqa: E731
        window_keys, window_values = windows(keys), windows(values)
        reference = grouped[:, :, 520:580].reshape(1, heads, -1, dim)
        held_out = grouped[:, :, 580:640].reshape(heads, -1, dim)
        merged = attention_matching_merge(window_keys, window_values, reference, slots=4)
        pick = merged.selected[..., None].expand(-1, -1, -1, dim)
        candidates = {
            "attention matching": (merged.keys, merged.values, merged.bias),
            "kept keys": (window_keys.gather(-2, pick), window_values.gather(-2, pick), torch.zeros(8, heads, 4)),
            "mean pooling, log-count bias": (
                window_keys.view(8, heads, 4, 8, dim).mean(-2), window_values.view(8, heads, 4, 8, dim).mean(-2), torch.full((8, heads, 4), math.log(8)),
            ),
        }

        def attend(slot_keys, slot_values, bias):
            flat = lambda t: t.transpose(0, 1).reshape(heads, -1, t.shape[-1])  # noqa: E731
            all_keys = torch.cat([keys[:, :256], flat(slot_keys), keys[:, 512:580]], 1)
            all_values = torch.cat([values[:, :256], flat(slot_values), values[:, 512:580]], 1)
            all_bias = torch.cat([torch.zeros(heads, 256), bias.transpose(0, 1).reshape(heads, -1), torch.zeros(heads, 68)], 1)
            return (held_out @ all_keys.transpose(1, 2) * dim**-0.5 + all_bias[:, None]).softmax(-1) @ all_values

        dense = attend(window_keys, window_values, torch.zeros(8, heads, 32))
        for name, candidate in candidates.items():
            errors[name].append(float((attend(*candidate) - dense).norm() / dense.norm()))
    mean = {name: sum(e) / len(e) for name, e in errors.items()}
    print({name: round(e, 4) for name, e in mean.items()})
    assert mean["attention matching"] < 0.9 * min(mean["kept keys"], mean["mean pooling, log-count bias"]), mean


def test_a_window_of_equal_keys_merges():
    """Padding tokens' keys are all zero in the first layer: equal keys make the Gram matrix singular (once a LinAlgError)."""
    key = torch.randn(8, generator=torch.Generator().manual_seed(0))
    merged = attention_matching_merge(key.expand(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 16, 8), slots=2)
    assert all(bool(torch.isfinite(t).all()) for t in (merged.keys, merged.values, merged.bias))

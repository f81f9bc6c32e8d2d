"""The decode kernel that also reports the attention each slot got (`kvcompress.scored_attention`, used by H2O on a GPU)
against the PyTorch path, on a GPU or on the CPU under Triton's interpreter
(`test_the_scored_kernel_tests_pass_under_the_triton_interpreter` runs them there)."""

import pytest
import torch
from conftest import DEVICE, assert_pass_under_triton_interpreter, tiny_model
from test_latent_attention import decode_logits, padded_prompt

from kvcompress import H2OCache, attention, latent_attention, scored_attention
from kvcompress.slots import FILLER, SYNTHESIZED


def kernel_runs() -> bool:
    return scored_attention.available(torch.empty(1, 32, device=DEVICE))


needs_kernel = pytest.mark.skipif(not kernel_runs(), reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1 (test_the_scored_kernel_tests_pass_under_the_triton_interpreter)")


def reference(queries, keys, values, token_ids, bias, new_seen, scaling):
    """The same attention in float32 PyTorch: output, probabilities."""
    logits = torch.einsum("bhrd,bhsd->bhrs", queries.float(), keys.float()) * scaling
    if bias is not None:
        logits[..., : bias.shape[2]] += bias[:, :, None].float()
    seen = (token_ids != FILLER)[:, :, None].clone()
    seen[..., -1] &= new_seen.expand(seen.shape[0])[:, None, None]
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("bhrs,bhsd->bhrd", probs, values.float()), probs


@needs_kernel
@pytest.mark.parametrize("rows", [3, 20])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("programs_wanted", [1, 16])
def test_scored_kernel_equals_pytorch(rows, with_bias, programs_wanted, monkeypatch):
    """Keys and values as views of a larger buffer (a store with room), fillers and synthesized slots among the slots, a
    padding row whose new token does not see itself, a bias on the store's slots, and one span of many blocks per
    (row, head) or several spans."""
    monkeypatch.setattr(scored_attention, "BLOCK_SLOTS", 16)
    monkeypatch.setattr(latent_attention, "PROGRAMS_WANTED", programs_wanted)  # spans_of reads it there
    generator = torch.Generator().manual_seed(0)
    batch, heads, slots, dim = 2, 2, 300, 32
    buffer = torch.randn(batch, heads, slots + 40, 2, dim, generator=generator)
    keys, values = buffer[:, :, :slots, 0].to(DEVICE), buffer[:, :, :slots, 1].to(DEVICE)
    queries = torch.randn(batch, heads, rows, dim, generator=generator).to(DEVICE)
    token_ids = torch.arange(slots, dtype=torch.int32).repeat(batch, heads, 1)
    token_ids[torch.rand(batch, heads, slots, generator=generator) < 0.3] = FILLER
    token_ids[..., 1:200:7] = SYNTHESIZED  # merged slots (with their bias): seen like any other
    token_ids[..., -1] = slots
    bias = torch.randn(batch, heads, 200, generator=generator).to(DEVICE) if with_bias else None
    for new_seen in ([[True, True], [False, True]], [[True]]):  # per row (a column of a mask: strided), or one for every row
        new_seen = torch.tensor(new_seen, device=DEVICE)[:, 0]
        output, received = scored_attention.attend_and_score(queries, keys, values, token_ids.to(DEVICE), bias, new_seen, 0.3)
        expected_output, expected_probs = reference(queries, keys, values, token_ids.to(DEVICE), bias, new_seen, 0.3)
        counted = new_seen.expand(batch).float()[:, None, None]  # a padding token's attention counts for no slot
        assert output.dtype == queries.dtype and torch.allclose(output, expected_output, atol=1e-4)
        assert torch.allclose(received, expected_probs.sum(2) * counted, atol=1e-5)
        assert bool(received[token_ids.to(DEVICE) == FILLER].eq(0).all())


@needs_kernel
def test_h2o_decode_steps_equal_the_pytorch_path(monkeypatch):
    """Every decode step of H2O over a padded batch (fillers, an evicting store): the kernel's output and the attention
    each slot received equal the PyTorch path's on the same state."""
    monkeypatch.setattr(scored_attention, "BLOCK_SLOTS", 16)
    model = tiny_model("llama", hidden_size=96, head_dim=32, num_attention_heads=6, num_key_value_heads=2)
    attend, pairs = attention._attend_over_slots, []

    def both(layer, query, *args):
        kernel = attend(layer, query, *args)
        with monkeypatch.context() as patch:
            patch.setattr(scored_attention, "available", lambda *_: False)
            pairs.append((query.shape[2], kernel, attend(layer, query, *args)))
        return kernel

    monkeypatch.setattr(attention, "_attend_over_slots", both)
    decode_logits(model, H2OCache(budget=64), *padded_prompt())
    decode_steps = [pair for pair in pairs if pair[0] == 1]
    assert len(decode_steps) == 2 * 50
    for _, (output, received), (expected_output, expected_received) in decode_steps:
        assert torch.allclose(output, expected_output, atol=1e-4)
        assert torch.allclose(received, expected_received, atol=1e-5)


@pytest.mark.skipif(kernel_runs(), reason="the kernel tests above run in this process (on a GPU, or under the interpreter already)")
def test_the_scored_kernel_tests_pass_under_the_triton_interpreter():
    assert_pass_under_triton_interpreter(__file__, "equal", 9)

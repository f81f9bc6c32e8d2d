"""RoPE helpers against transformers' own rotation: `rotate` (and its inverse), and the complex-number form
(`rope_table`, `paired_order`, `rotate_pairs_`) that low-rank attention on the CPU turns its decoded keys with."""

import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvcompress.lowrank import PCACompressor
from kvcompress.rope import paired_order, rope_table, rotate, rotate_pairs_


def transformers_rotation(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`x` ``[B, H, n, D]`` rotated to `positions` ``[B, n]`` by transformers' Llama code (full-width cos and sin; angles
    in float32, as the model's rotary embedding computes them, the rest in float64)."""
    angles = (positions[..., None].float() * inv_freq.float()).double()
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    return apply_rotary_pos_emb(x.double(), x.double(), cos, sin)[1]


def inv_freq_of(dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))


@settings(max_examples=30, deadline=None)
@given(half=st.sampled_from([1, 2, 4, 32, 64]), heads=st.integers(1, 3), length=st.integers(1, 9), far=st.integers(0, 2_000_000), seed=st.integers(0, 2**16))
def test_rotating_pairs_as_complex_numbers_equals_transformers_rotation(half, heads, length, far, seed):
    """For any head size, positions near 0 or millions of tokens on: keys in pair order turned by table rows are the
    model's rotated keys in pair order, and `rotate` undoes and redoes that rotation."""
    dim = 2 * half
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, heads, length, dim, generator=generator, dtype=torch.float64)
    positions = torch.randint(0, 64, (2, length), generator=generator) + far
    inv_freq = inv_freq_of(dim)
    expected = transformers_rotation(keys, positions, inv_freq)

    order = paired_order(dim)
    assert sorted(order.tolist()) == list(range(dim))
    assert order.view(half, 2).tolist() == [[i, i + half] for i in range(half)]  # each pair RoPE turns together, side by side
    table = rope_table(inv_freq, int(positions.max()) + 1).double()
    paired = keys[..., order]
    turned = rotate_pairs_(paired, torch.nn.functional.embedding(positions, table))
    assert turned is paired  # in place: the keys it turns are a fresh decode
    assert torch.allclose(turned, expected[..., order], atol=1e-5)
    assert torch.allclose(rotate(keys.float(), positions, inv_freq).double(), expected, atol=1e-5)
    assert torch.allclose(rotate(expected.float(), positions, inv_freq, inverse=True).double(), keys, atol=1e-5)


def test_rotating_pairs_takes_per_head_positions_and_half_precision():
    """Per-head table rows ``[B, H, n, D]`` (each head its own positions) turn each head by its own; bfloat16 keys come
    back in bfloat16, turned in float32 (complex bfloat16 does not exist)."""
    dim, inv_freq = 8, inv_freq_of(8)
    keys = torch.randn(1, 2, 5, dim)
    positions = torch.tensor([[[0, 3, 7, 9, 20]], [[5, 6, 100, 101, 4000]]]).view(1, 2, 5)
    table = rope_table(inv_freq, 4001)
    order = paired_order(dim)
    turned = rotate_pairs_(keys[..., order], torch.nn.functional.embedding(positions, table))
    for head in range(2):
        expected = transformers_rotation(keys[:, head : head + 1], positions[:, head], inv_freq).float()
        assert torch.allclose(turned[:, head : head + 1], expected[..., order], atol=1e-5)
    half = rotate_pairs_(keys[..., order].bfloat16(), torch.nn.functional.embedding(positions, table))
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), turned, atol=0.05)


def test_decoded_keys_are_the_models_rotation_of_the_decoded_latents_in_either_layout():
    """`decode_keys` (complex turn of the paired decoder's output, for the CPU path) equals decoding with the plain
    decoder and rotating as transformers does, for heads side by side with different ranks and for per-head latents."""
    from test_lowrank import calibrate, uniform

    from kvcompress.config import HeadRanks

    model = tiny_model("llama")
    ranks = uniform(model, 8)
    ranks.heads[0, 0] = HeadRanks(3, 14)
    compressor: PCACompressor = calibrate(model).fit("pca", ranks, {"sink": 4, "window": 8, "block_size": 4})[0]
    keys = torch.randn(2, 2, 6, 16)
    positions = torch.tensor([[0, 1, 2, 50, 51, 900], [3, 4, 5, 6, 7, 8]])
    for per_head in (False, True):
        token_ids = positions[:, None].expand(2, 2, 6).to(torch.int32)
        latents = compressor.encode(0, keys, keys, token_ids, per_head=per_head)["key_latents"]
        plain = compressor.projections(0, keys.device, keys.dtype)[0].decode(latents)
        expected = transformers_rotation(plain, positions, compressor.inv_freq(keys.device)).float()
        decoded = compressor.decode_keys(0, latents, token_ids)
        assert torch.allclose(decoded, expected, atol=1e-5)
        paired = compressor.decode_keys(0, latents, token_ids, paired=True)
        assert torch.equal(paired, decoded[..., paired_order(16)])

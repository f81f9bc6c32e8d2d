"""Behaviour on the real default model, SmolLM2-135M-Instruct: the evaluator is exact, the caches keep their promises."""

import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from kvcompress import H2OCache, StreamingLLMCache
from kvcompress.calibration.cli import main as cli_main
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import DEPTHS, passkey_context, passkey_trial, reference_perplexity, streaming_perplexity

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def heldout_ids(default_model):
    return default_model[1](heldout_text()).input_ids


def test_dense_streaming_perplexity_equals_one_forward_pass(default_model, heldout_ids):
    model, _ = default_model
    ids = torch.tensor([heldout_ids[:1024]])
    streamed = streaming_perplexity(model, ids, DynamicCache(), chunk_size=32)
    reference = reference_perplexity(model, ids, first_scored=32)
    assert streamed.scored_tokens == 1024 - 32
    assert abs(streamed.perplexity / reference - 1) < 1e-3
    assert 5 < reference < 40  # real prose, a working model


def test_dense_passkey_retrieval_at_1k_tokens(default_model, heldout_ids):
    model, tokenizer = default_model
    for index, depth in enumerate(DEPTHS):
        key = 31337 + 1111 * index
        context, question = passkey_context(tokenizer, heldout_ids[2048:], 1024, depth, key)
        assert passkey_trial(model, tokenizer, DynamicCache(), context, question, key), f"dense missed the key at depth {depth}"


@pytest.fixture(scope="module")
def streaming_results(default_model, heldout_ids):
    model, _ = default_model
    ids = torch.tensor([heldout_ids[:768]])
    caches = {"dense": DynamicCache(), "h2o 2:1": H2OCache(ratio=2), "h2o 4:1": H2OCache(ratio=4), "streamingllm 4:1": StreamingLLMCache(ratio=4)}
    return {name: streaming_perplexity(model, ids, cache, chunk_size=32) for name, cache in caches.items()}


@pytest.mark.parametrize("name, ratio", [("h2o 2:1", 2), ("h2o 4:1", 4), ("streamingllm 4:1", 4)])
def test_compressed_caches_hold_the_promised_memory(streaming_results, name, ratio):
    result = streaming_results[name]
    assert result.dense_nbytes == streaming_results["dense"].nbytes
    assert 0.95 * ratio < result.dense_nbytes / result.nbytes < 1.02 * ratio


def test_h2o_stays_close_to_dense_at_2x(streaming_results):
    assert streaming_results["h2o 2:1"].perplexity < 1.10 * streaming_results["dense"].perplexity


def test_h2o_beats_streamingllm_at_equal_memory(streaming_results):
    h2o, streaming = streaming_results["h2o 4:1"], streaming_results["streamingllm 4:1"]
    assert abs(h2o.nbytes / streaming.nbytes - 1) < 0.05
    assert h2o.perplexity < streaming.perplexity


def test_generate_cli_demo_finds_the_passkey_with_a_4x_smaller_cache(capsys):
    cli_main(["generate", "--cache", "h2o", "--ratio", "4", "--context-tokens", "1024"])
    printed = capsys.readouterr().out
    assert "-> found" in printed
    assert float(re.search(r"compression (\d+\.\d+):1", printed).group(1)) > 3.5


def test_generate_cli_meets_a_fitted_caches_ratio_at_the_prompts_length(capsys):
    """README command 1: the shipped gates at ratio=8 are built for the demo prompt's length, so they hold about 1/8 of it."""
    cli_main(["generate", "--compressor", "kvcompress/smollm2-135m-instruct-gate@ratio=8"])
    printed = capsys.readouterr().out
    assert "-> found" in printed and "Note:" not in printed
    assert abs(int(re.search(r"Prompt: (\d+) tokens of WikiText with a pass key hidden at depth 0.5, and a question", printed).group(1)) - 1536) <= 8
    assert 7 < float(re.search(r"compression (\d+\.\d+):1", printed).group(1)) < 9


def test_generate_cli_chats_on_the_embedded_model_with_the_shipped_gates_by_default(capsys):
    """No cache chosen: the shipped gates at 8:1, whose exact window holds a short message whole (a baseline's 8:1 keeps 5 of
    its 37 tokens), so the answer is the model's own. 8:1 cannot be met at 37 tokens: the cache says so and meets it from
    4096 tokens on (built for the prompt's length, it had refused to run), holding the message in about dense's bytes."""
    cli_main(["generate", "What is the capital of France?", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert "Cache: GatedCache" in printed and "the answer sees only those" not in printed
    assert "Note: the prompt's 37 tokens are too few for this cache's ratio= (its exact sink and window alone would hold" in printed
    assert "Paris" in re.search(r"Answer: (.*)", printed).group(1)
    assert float(re.search(r"compression (\d+\.\d+):1; every token is still in the exact window", printed).group(1)) > 0.8


def test_generate_cli_says_when_a_ratio_leaves_too_little_of_a_short_message(capsys):
    cli_main(["generate", "What is the capital of France?", "--max-new-tokens", "4", "--cache", "h2o"])
    printed = capsys.readouterr().out
    assert re.search(r"Note: at 8:1 this cache keeps about \d of the prompt's \d\d tokens: the answer sees only those", printed)
    assert "Cache: H2OCache(HeavyHitters(budget=8:1, recent_share=0.5)" in printed and "window=" not in printed
    assert printed.count("[stopped at 4 new tokens: --max-new-tokens for more]") == 1  # an answer cut short says so
    cli_main(["generate", "What is the capital of France?", "--max-new-tokens", "4", "--budget", "256"])
    printed = capsys.readouterr().out
    assert "Note:" not in printed
    assert float(re.search(r"compression (\d+\.\d+):1", printed).group(1)) > 0.8  # nothing compressed, held in little more than dense's bytes (0.59 when the room was 32 slots)


def test_the_readmes_quick_start_runs_as_written(capsys):
    """The README's first Python block, executed as a user would paste it (before transformers 5.24 with the change its
    comment says, past_key_values= for cache=): an answer, and about 1/8 of the dense bytes."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("```python\n", readme.index("## Quick start")) + len("```python\n")
    code = readme[start : readme.index("```", start)]
    assert "cache=cache" in code and "transformers < 5.24: past_key_values=cache" in code
    if Version(transformers.__version__) < Version("5.24"):
        code = code.replace("cache=cache", "past_key_values=cache")
    exec(compile(code, "README.md", "exec"), {})
    *_, answer, ratio = capsys.readouterr().out.strip().splitlines()
    assert answer.strip() and 6 < float(ratio) < 9

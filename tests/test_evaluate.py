"""Evaluator mechanics on a tiny model: exact streaming perplexity, the table, the plot, bad input."""

import json
from types import SimpleNamespace

import pytest
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress import GatedCache, H2OCache
from kvcompress.calibration.plots import _line_name, plot_quality_vs_compression
from kvcompress.corpus import load_text, split_text
from kvcompress.evaluation.harness import (
    CacheSpec,
    EvaluationRow,
    attention_cosine,
    attention_outputs,
    evaluate,
    format_table,
    reference_perplexity,
    results_json,
    streaming_perplexity,
)


@pytest.mark.parametrize("chunk", [8, 13])
def test_dense_streaming_perplexity_is_exact(chunk):
    model, ids = tiny_model("qwen3"), prompt_ids(100)
    streamed = streaming_perplexity(model, ids, DynamicCache(), chunk_size=chunk)
    assert streamed.scored_tokens == 100 - chunk
    assert abs(streamed.perplexity / reference_perplexity(model, ids, chunk) - 1) < 1e-5


def test_compressed_streaming_perplexity_reports_memory_held():
    result = streaming_perplexity(tiny_model(), prompt_ids(100), H2OCache(budget=20), chunk_size=10)
    assert result.nbytes < result.dense_nbytes / 4


def test_attention_cosine_is_one_for_dense_and_lower_for_a_compressed_cache():
    model, ids = tiny_model(), prompt_ids(100)
    dense = attention_outputs(model, ids, DynamicCache(), chunk_size=10, last_tokens=16)
    assert len(dense) == 2 and dense[0].shape == (16, 64)
    assert attention_cosine(attention_outputs(model, ids, DynamicCache(), chunk_size=10, last_tokens=16), dense) == pytest.approx(1.0, abs=1e-5)
    assert attention_cosine(attention_outputs(model, ids, H2OCache(budget=12), chunk_size=10, last_tokens=16), dense) < 0.99


def test_plot_lines_are_methods_and_their_method_options():
    assert _line_name("h2o 8:1") == "h2o"
    assert _line_name("sidecar sidecar-8 merge=attention_matching") == "sidecar merge=attention_matching"
    assert _line_name("gate gate-recall keep_ratio=0.07 policy=head") == "gate policy=head"


def test_streaming_perplexity_needs_more_than_one_chunk():
    with pytest.raises(ValueError, match="more than one chunk"):
        streaming_perplexity(tiny_model(), prompt_ids(16), DynamicCache(), chunk_size=32)


@pytest.mark.parametrize("spec, message", [(("pca", 2), "Unknown cache 'pca'"), (("h2o", None), "needs a compression ratio")])
def test_bad_cache_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        CacheSpec(*spec)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("kvcompress/smollm2-135m-instruct-gate@keep_ration=0.1", TypeError, "GatedCache has no option 'keep_ration'; its options: keep_ratio, ratio"),
        ("kvcompress/smollm2-135m-instruct-pca-2x@ratio=8", ValueError, "at most"),
        ("compose@gate=kvcompress/smollm2-135m-instruct-gate,keep_ration=0.25", TypeError, "ComposedCache has no option 'keep_ration'; its options: gate, lowrank, keep_ratio"),
    ],
)
def test_evaluation_refuses_a_bad_cache_before_it_runs_any(spec, error, message):
    """Every cache is built before the first one runs: no model, tokenizer or text is touched when one of them cannot be."""
    specs = [CacheSpec("dense"), CacheSpec("h2o", 4), CacheSpec.fitted(spec)]
    with pytest.raises(error, match=message):
        evaluate(None, None, specs, text=None)


def test_caches_given_as_names_and_a_text_too_short_for_the_tasks_say_what_to_give():
    with pytest.raises(TypeError, match=r"evaluate takes CacheSpec objects \(e.g. CacheSpec\('h2o', 8\).*got 'h2o'"):
        evaluate(None, None, [CacheSpec("dense"), "h2o"], text=None)
    words = lambda text: SimpleNamespace(input_ids=text.split())  # noqa: E731  (a tokenizer of words)
    with pytest.raises(ValueError, match=r"has 500 tokens; the perplexity text and the pass-key prompts need 3200 \(128 \+ 2 trials x 1536\).*--ppl-tokens"):
        evaluate(None, words, [CacheSpec("dense")], text="word " * 500, ppl_tokens=128)


def test_a_ratio_the_pass_key_prompts_are_too_short_for_names_the_cache_and_what_to_change():
    specs = [CacheSpec("dense"), CacheSpec.fitted("kvcompress/smollm2-135m-instruct-gate@ratio=8")]
    with pytest.raises(ValueError, match=r"gate smollm2-135m-instruct-gate ratio=8 cannot be built for the 512-token pass-key prompts: At 512 tokens "
                       r".*already hold .*DIR@ratio=8,window=16\) and --passkey-tokens"):
        evaluate(None, None, specs, text=None, passkey_tokens=512)
    CacheSpec.fitted("kvcompress/smollm2-135m-instruct-gate@ratio=8,window=16").build(512)  # what the message suggests builds


def _rows():
    return [
        EvaluationRow("dense", 10.0, {0.1: 1.0, 0.9: 1.0}, 1000, 1000),
        EvaluationRow("h2o 2:1", 11.0, {0.1: 1.0, 0.9: 0.5}, 500, 1000),
        EvaluationRow("h2o 4:1", 13.0, {0.1: 0.5, 0.9: 0.0}, 250, 1000),
    ]


def test_table_lists_every_cache_with_its_measured_ratio_and_change_vs_dense():
    table = format_table(_rows(), 1024, 1536).splitlines()
    assert len(table) == 2 + 3
    assert "| h2o 4:1 | 4.00 |" in table[4] and "+30.0%" in table[4] and "| 0.25 |" in table[4]


def test_results_json_keeps_every_row_and_what_produced_it():
    results = json.loads(results_json(_rows(), model="m", data="d", settings={"ppl_tokens": 64}, command="kvcompress evaluate"))
    assert {key: results[key] for key in ("model", "data", "settings", "command")} == {"model": "m", "data": "d", "settings": {"ppl_tokens": 64}, "command": "kvcompress evaluate"}
    assert results["versions"]["kvcompress"] == kvcompress.__version__ and set(results["versions"]) == {"kvcompress", "transformers", "torch"}
    assert [row["cache"] for row in results["rows"]] == ["dense", "h2o 2:1", "h2o 4:1"] and results["rows"][2]["measured_ratio"] == 4.0
    assert results["rows"][1]["passkey"] == {"0.1": 1.0, "0.9": 0.5} and results["rows"][1]["perplexity"] == 11.0


def test_plot_is_written(tmp_path):
    path = plot_quality_vs_compression(_rows(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_quality_vs_compression(_rows(), tmp_path / "named") == tmp_path / "named.png"  # the file matplotlib writes, reported
    assert (tmp_path / "named.png").is_file()


def test_corpus_split_keeps_a_heldout_tail(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(100)))
    calibration, heldout = split_text(load_text(corpus))
    assert calibration + heldout == corpus.read_text()
    assert 0.15 < len(heldout) / len(corpus.read_text()) < 0.25
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")


def test_a_local_dataset_directory_loads_through_datasets(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part.txt").write_text("first line of prose\nsecond line of prose\n")
    text = load_text(f"{corpus}@train")
    assert "first line of prose" in text and "second line of prose" in text


@pytest.mark.parametrize("nbits", [4, 2])
def test_transformers_quantized_cache_is_counted_by_what_it_stores(nbits):
    """The peer rows' memory: HQQ's packed integers and their float32 scale and zero point per group of 64, against the
    dense bytes of every token seen (the evaluator's DynamicCache count for the same prompt)."""
    pytest.importorskip("hqq")
    from transformers import QuantizedCache

    from kvcompress import cache_kwargs
    from kvcompress.evaluation.harness import cache_nbytes

    model, ids = tiny_model(), prompt_ids(200)
    quantized, dense = QuantizedCache(backend="hqq", config=model.config, nbits=nbits), DynamicCache()
    for cache in (quantized, dense):
        model(input_ids=ids, **cache_kwargs(cache))
    held, dense_bytes = cache_nbytes(quantized)
    assert dense_bytes == cache_nbytes(dense)[0]
    assert held / dense_bytes == pytest.approx((nbits / 8 + 8 / 64) / 4, rel=0.01)  # the prompt quantized whole: no exact residual


def test_a_fitted_spec_with_a_ratio_meets_it_at_the_length_it_is_built_for():
    """``DIR@ratio=8`` is met at the tokens the evaluator feeds (a keep ratio holds another share at another length), unless
    the spec names its own context; a keep ratio is what it says at any length."""
    from kvcompress.hub import PRETRAINED_DIR

    gate = PRETRAINED_DIR / "smollm2-135m-instruct-gate"
    spec = CacheSpec.fitted(f"{gate}@ratio=8")
    short, long = spec.build(1536).keep_ratio, spec.build(6144).keep_ratio
    assert short == GatedCache.from_pretrained(gate, ratio=8, context=1536).keep_ratio
    assert long == GatedCache.from_pretrained(gate, ratio=8, context=6144).keep_ratio and long > short  # the exact window weighs less
    assert CacheSpec.fitted(f"{gate}@ratio=8,context=6144").build(1536).keep_ratio == long
    assert CacheSpec.fitted(f"{gate}@keep_ratio=0.05").build(6144).keep_ratio == 0.05
    assert isinstance(CacheSpec("h2o", 8).build(6144), H2OCache)

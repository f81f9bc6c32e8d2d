"""The low-rank caches on the real default model: calibration keeps its promises on held-out text."""

import json

import pytest
import torch
from transformers import DynamicCache

from kvcompress import cache_kwargs
from kvcompress.calibration.calibrate import LowRankCalibration
from kvcompress.calibration.cli import main as cli_main
from kvcompress.config import RankConfig
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import passkey_context, passkey_trial
from kvcompress.lowrank import PCACache

pytestmark = pytest.mark.model
SETTINGS = {"sink": 4, "window": 64, "block_size": 16}


@pytest.fixture(scope="module")
def calibration(default_model):
    model, tokenizer = default_model
    return LowRankCalibration.collect(model, tokenizer, samples=1024, tokens=4096, fisher_sequences=2, eval_tokens=512)


def test_fisher_ranks_at_half_memory_beat_uniform_ranks_and_stay_close_to_dense(calibration):
    uniform = RankConfig.uniform(30, 3, 64, 64, 32)
    fisher, _ = calibration.ranks(RankConfig.uniform(30, 3, 64, 64, 64), 0.5)
    assert fisher.memory_fraction() == uniform.memory_fraction() == 0.5
    baseline = None
    reports = {}
    for name, ranks in (("uniform", uniform), ("fisher", fisher)):
        compressor, metrics = calibration.fit("pca", ranks, SETTINGS)
        reports[name] = calibration.measure(compressor, metrics, name, 0.0, baseline=baseline)
        baseline = reports[name].baseline_perplexity
    assert reports["fisher"].perplexity < reports["uniform"].perplexity
    assert reports["fisher"].degradation < 0.05
    assert reports["fisher"].nbytes < 0.65 * reports["fisher"].dense_nbytes  # measured at 512 tokens; the exact window and room for the next block included


def test_a_saved_pca_compressor_finds_the_passkey(calibration, default_model, tmp_path):
    model, tokenizer = default_model
    ranks, _ = calibration.ranks(RankConfig.uniform(30, 3, 64, 64, 64), 0.5)
    calibration.fit("pca", ranks, SETTINGS)[0].save_pretrained(tmp_path)
    haystack = tokenizer(heldout_text()).input_ids[1024:]
    for depth, key in ((0.2, 48213), (0.6, 90317)):
        context, question = passkey_context(tokenizer, haystack, 1024, depth, key)
        cache = PCACache.from_pretrained(tmp_path)
        assert passkey_trial(model, tokenizer, cache, context, question, key), f"missed the key at depth {depth}"
        assert cache.nbytes() < 0.6 * cache.dense_nbytes()


def test_calibrate_command_writes_a_loadable_artifact_and_a_summary(tmp_path, capsys, default_model):
    output = tmp_path / "pca-r32"
    cli_main(["calibrate", "--method", "pca", "--rank", "32", "--samples", "512", "--tokens", "2048", "--eval-tokens", "256", "--output", str(output)])
    printed = capsys.readouterr().out
    for line in ("Baseline perplexity:", "Compressed perplexity:", "Perplexity degradation:", "Memory savings:", "Calibration time:"):
        assert line in printed
    results = json.loads((output / "calibration_results.json").read_text())
    assert results["rank_memory_fraction"] == 0.5 and results["perplexity"] > results["baseline_perplexity"] > 1
    assert json.loads((output / "ranks.json").read_text())["per_layer_head"]["29/2"] == {"enabled": True, "algo": "pca", "d_k": 64, "d_v": 64, "rank": 32}
    cache = PCACache.from_pretrained(output)
    model, tokenizer = default_model
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    reference = model.generate(**inputs, **cache_kwargs(DynamicCache()), max_new_tokens=6, do_sample=False)
    # A short prompt never leaves the exact recent window: the output is the dense one.
    assert torch.equal(model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=6, do_sample=False), reference)

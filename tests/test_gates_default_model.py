"""Retention gates on the real default model: the gates predict future attention, and the cache they drive
beats StreamingLLM at the same measured memory."""

import pytest
import torch

from calibration.data import heldout_text, load_text, split_text
from calibration.evaluate import streaming_perplexity
from calibration.gates import collect_retention_labels, gate_compressor, train_gates
from calibration.lowrank import rope_inv_freq
from kvcompress import StreamingLLMCache
from kvcompress.gate import GatedCache
from kvcompress.hub import model_signature

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def trained(default_model):
    model, tokenizer = default_model
    ids = torch.tensor(tokenizer(split_text(load_text())[0]).input_ids)
    inv_freq = rope_inv_freq(model)
    labels = collect_retention_labels(model, ids, inv_freq, sequence_length=512, max_tokens=6 * 512)
    with torch.enable_grad():
        gates, probabilities, report = train_gates(labels, steps=200)
    config = {"base_model": model_signature(model), "cache": {"sink": 4, "window": 64, "block_size": 16}}
    return gate_compressor(gates, probabilities, inv_freq, config), report


def test_gates_predict_which_tokens_future_queries_attend(trained):
    _, report = trained
    assert report["median_auc"] > 0.85
    assert 0.02 < report["mean_positive_rate"] < 0.5


def test_gated_cache_beats_streamingllm_at_the_same_memory(trained, default_model):
    model, tokenizer = default_model
    compressor, _ = trained
    ids = torch.tensor([tokenizer(heldout_text()).input_ids[:768]])
    gated = streaming_perplexity(model, ids, GatedCache(compressor, 0.15))
    ratio = gated.dense_nbytes / gated.nbytes
    assert ratio > 2.5  # memory really saved, fillers of the per-head layout included
    streaming = streaming_perplexity(model, ids, StreamingLLMCache(ratio=ratio))
    assert streaming.nbytes >= 0.95 * gated.nbytes  # no more memory for the baseline than for the gates
    assert gated.perplexity < streaming.perplexity


def test_calibrate_command_fits_saves_and_reports_gates(tmp_path, capsys):
    import json

    from calibration.cli import main

    output = tmp_path / "gate"
    main(["calibrate", "--method", "gate", "--gate-tokens", "3072", "--gate-steps", "20", "--eval-tokens", "256", "--output", str(output), "--plot", str(tmp_path / "gates.png")])
    printed = capsys.readouterr().out
    assert "Perplexity degradation:" in printed and "median_auc" in printed
    report = json.loads((output / "gate_report.json").read_text())
    assert len(report["heads"]) == 90 and 0 < report["mean_positive_rate"] < 1
    assert (tmp_path / "gates.png").stat().st_size > 10_000
    cache = GatedCache.from_pretrained(output, keep_ratio=0.2, policy="layer")
    assert cache.compressor.config["label"]["threshold"] == 0.02

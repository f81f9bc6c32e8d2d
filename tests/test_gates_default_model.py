"""Retention gates on the real default model: the gates predict future attention, and the cache they drive
beats StreamingLLM at the same measured memory."""

import re

import pytest
import torch

from kvcompress import GateCompressor, StreamingLLMCache
from kvcompress.calibration.gates import collect_retention_labels, train_gates
from kvcompress.calibration.recall import TEMPLATES, recall_sequences
from kvcompress.corpus import heldout_text, load_text, split_text
from kvcompress.evaluation.harness import streaming_perplexity
from kvcompress.gate import GatedCache
from kvcompress.hub import model_signature
from kvcompress.rope import rope_inv_freq

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
    return GateCompressor.from_gates(gates, probabilities, inv_freq, config), report


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

    from kvcompress.calibration.cli import main

    output = tmp_path / "gate"
    main(["calibrate", "--method", "gate", "--gate-tokens", "3072", "--gate-steps", "20", "--eval-tokens", "256", "--output", str(output), "--plot", str(tmp_path / "gates.png")])
    printed = capsys.readouterr().out
    assert "Perplexity degradation:" in printed and "median_auc" in printed
    report = json.loads((output / "gate_report.json").read_text())
    assert len(report["heads"]) == 90 and 0 < report["mean_positive_rate"] < 1
    assert (tmp_path / "gates.png").stat().st_size > 10_000
    assert report["recall"]["statement_positive_rate"] > report["recall"]["prose_positive_rate"]
    cache = GatedCache.from_pretrained(output, keep_ratio=0.2, policy="layer")
    assert cache.compressor.config["label"]["threshold"] == 0.02
    assert cache.compressor.config["calibration"]["recall_facts_per_sequence"] == 4 and cache.compressor.config["calibration"]["tokens"] == 3072


def test_recall_sequences_state_facts_well_before_the_questions_that_ask_for_them(default_model):
    _, tokenizer = default_model
    prose = torch.tensor(tokenizer(split_text(load_text())[0]).input_ids[: 4 * 512])
    recall = recall_sequences(prose, tokenizer, sequence_length=512, facts=2, answer_room=96, min_distance=128)
    assert recall.token_ids.shape == recall.statements.shape and len(recall.token_ids) % 512 == 0 and len(recall.token_ids) >= 3 * 512
    assert torch.equal(recall.token_ids[:16], prose[:16])  # prose in its own order around the statements
    wordings = set()
    for ids, marks in zip(recall.token_ids.view(-1, 512), recall.statements.view(-1, 512)):
        statements = tokenizer.decode(ids[marks])
        wordings |= {statement for statement, _ in TEMPLATES if re.search(re.escape(statement).replace(r"\{subject\}", r"[a-zA-Z ]+").replace(r"\{value\}", r"\d+"), statements)}
        questions = tokenizer.decode(ids[-96:])
        values = re.findall(r"\d+", statements)
        assert len(values) == 2 and all(re.search(rf"\b{value}\.", questions) for value in values)  # each recalled at the end
        assert int(marks.nonzero().max()) < 512 - 96 - 128  # each statement at least min_distance before the questions
    assert len(wordings) >= 5  # several kinds of sentence (7 of 9 here): gates keep the kind they saw
    with pytest.raises(ValueError, match="Too little calibration text"):
        recall_sequences(prose[:300], tokenizer, sequence_length=512)
    with pytest.raises(ValueError, match="facts must be at least 1"):
        recall_sequences(prose, tokenizer, facts=0)
    with pytest.raises(ValueError, match="more than answer_room"):
        recall_sequences(prose, tokenizer, sequence_length=512, facts=8, answer_room=40)


def test_labels_mark_the_statements_that_are_later_recalled(default_model):
    model, tokenizer = default_model
    prose = torch.tensor(tokenizer(split_text(load_text())[0]).input_ids[: 5 * 512])
    recall = recall_sequences(prose[: 4 * 512], tokenizer, sequence_length=512, facts=2)
    unasked = recall.token_ids.clone().view(-1, 512)
    unasked[:, -96:] = prose[-96:]  # the same statements, never asked for
    asked = collect_retention_labels(model, recall.token_ids, rope_inv_freq(model), sequence_length=512)
    control = collect_retention_labels(model, unasked.flatten(), rope_inv_freq(model), sequence_length=512)
    rates = asked.positive_rate_among(recall.statements), control.positive_rate_among(recall.statements)
    print(f"statement positive rate asked {rates[0]:.3f} vs never asked {rates[1]:.3f}; prose {asked.positive_rate_among(~recall.statements):.3f}")
    assert rates[0] > 1.3 * rates[1]

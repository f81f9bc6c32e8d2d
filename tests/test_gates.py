"""Retention gates (seed 004): labels from real attention, the stacked gate bank, training and its reports."""

import pytest
import torch

from calibration.gates import RetentionLabels, auc_per_group, collect_retention_labels, train_gates
from calibration.lowrank import rope_inv_freq
from conftest import VOCAB, tiny_model
from kvcompress.gate import GateBank


def test_one_layers_gates_score_in_one_batch_exactly_like_each_head_alone():
    torch.manual_seed(0)
    bank = GateBank(num_layers=3, num_heads=2, head_dim=16, hidden=32)
    keys = torch.randn(2, 2, 5, 16)
    batched = bank.layer_logits(1, keys)
    for head in range(2):
        group = 1 * 2 + head
        alone = torch.relu(keys[:, head] @ bank.w1[group] + bank.b1[group])
        alone = torch.relu(alone @ bank.w2[group] + bank.b2[group])
        assert torch.allclose(batched[:, head], (alone @ bank.w3[group] + bank.b3[group])[..., 0], atol=1e-5)


def test_auc_matches_counting_pairs():
    generator = torch.Generator().manual_seed(1)
    scores, labels = torch.rand(3, 50, generator=generator), torch.rand(3, 50, generator=generator) > 0.7
    for group in range(3):
        positives, negatives = scores[group][labels[group]], scores[group][~labels[group]]
        pairs = (positives[:, None] > negatives[None]).float().mean()
        assert float(auc_per_group(scores, labels)[group]) == pytest.approx(float(pairs), abs=1e-6)


def test_labels_come_from_the_models_attention_beyond_the_window():
    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(3, VOCAB, (3 * 256,), generator=torch.Generator().manual_seed(2))
    data = collect_retention_labels(model, ids, rope_inv_freq(model), window=16, sink=4, threshold=0.05, sequence_length=256, min_future=32)
    assert data.keys.shape == (2 * 2, 3 * (256 - 16 - 32 - 4), 16)
    assert data.future_attention.min() >= 0 and data.future_attention.max() <= 1
    rate = data.positive_rate()
    assert bool(((rate > 0) & (rate < 1)).all())
    # Checked by hand for one token: the largest group-mean attention from queries at least `window` later.
    from calibration.collect import recording_attention

    with torch.no_grad(), recording_attention(model) as recorded:
        model(input_ids=ids[:256][None])
        query, key, _ = recorded[1]
    scores = (query[0].view(2, 2, 256, 16) @ key[0][:, None].transpose(-1, -2)) / 4
    probs = scores.masked_fill(~torch.ones(256, 256, dtype=torch.bool).tril(), float("-inf")).softmax(-1).mean(1)
    token = 50
    expected = probs[1, token + 16 :, token].max()
    assert float(data.future_attention[1 * 2 + 1, token - 4]) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="Too little calibration data"):
        collect_retention_labels(model, ids[:100], rope_inv_freq(model), sequence_length=256)


def test_training_learns_a_separable_rule_and_reports_it():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(4, 1200, 8, generator=generator)
    future = torch.sigmoid(4 * keys[..., 0] + 2 * keys[..., 1]) * 0.2  # positive (>= 0.15) for about 1 token in 5
    data = RetentionLabels(keys, future, torch.arange(1200) // 200, num_layers=2, num_heads=2, window=8, threshold=0.15)
    with torch.enable_grad():
        gates, report = train_gates(data, hidden=32, steps=300, batch=128, evaluate_every=25)
    assert report["median_auc"] > 0.97
    head = report["heads"]["1/0"]
    assert 0.05 < head["positive_rate"] < 0.5
    assert sum(head["confusion"]["0.1"].values()) == 400  # the two held-out sequences
    assert head["confusion"]["0.1"]["fn"] <= head["confusion"]["0.5"]["fn"]  # a lower threshold misses fewer positives
    assert isinstance(gates, GateBank)


def test_the_gate_report_plots(tmp_path):
    from calibration.plots import plot_gate_report

    data = RetentionLabels(torch.randn(2, 600, 4), torch.rand(2, 600), torch.arange(600) // 100, 1, 2, 8, 0.8)
    with torch.enable_grad():
        _, report = train_gates(data, hidden=8, steps=50, batch=32, evaluate_every=25)
    assert plot_gate_report(report, tmp_path / "gates.png").stat().st_size > 10_000

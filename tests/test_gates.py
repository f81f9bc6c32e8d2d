"""Retention gates (seed 004): labels from real attention, the stacked gate bank, training and its reports."""

import pytest
import torch
from conftest import VOCAB, tiny_model
from hypothesis import given
from hypothesis import strategies as st

from kvcompress import ComposedCache, ConfigError, cache_kwargs
from kvcompress.calibration.cli import _gate_warnings
from kvcompress.calibration.gates import RetentionLabels, auc_per_group, collect_retention_labels, labelled_tokens, train_gates
from kvcompress.gate import GateBank
from kvcompress.rope import rope_inv_freq


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
    from kvcompress.calibration.collect import recording_attention

    with torch.no_grad(), recording_attention(model) as recorded:
        model(input_ids=ids[:256][None].to(model.device))
        query, key, _ = (t.float().cpu() for t in recorded[1])
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
        gates, _, report = train_gates(data, hidden=32, steps=300, batch=128, evaluate_every=25)
    assert report["median_auc"] > 0.97
    head = report["heads"]["1/0"]
    assert 0.05 < head["positive_rate"] < 0.5
    assert sum(head["confusion"]["0.1"].values()) == 400  # the two held-out sequences
    assert head["confusion"]["0.1"]["fn"] <= head["confusion"]["0.5"]["fn"]  # a lower threshold misses fewer positives
    assert isinstance(gates, GateBank)


def test_the_gate_report_plots(tmp_path):
    from kvcompress.calibration.plots import plot_gate_report

    data = RetentionLabels(torch.randn(2, 600, 4), torch.rand(2, 600), torch.arange(600) // 100, 1, 2, 8, 0.8)
    with torch.enable_grad():
        _, _, report = train_gates(data, hidden=8, steps=50, batch=32, evaluate_every=25)
    assert plot_gate_report(report, tmp_path / "gates.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ GatedCache
from conftest import assert_left_padded_batch_matches_rows, greedy, prompt_ids  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvcompress.gate import GateBudget, GateCompressor, GatedCache, fitted_thresholds  # noqa: E402
from kvcompress.hub import model_signature  # noqa: E402
from kvcompress.memory import kept_share  # noqa: E402
from kvcompress.settings import CacheSettings  # noqa: E402
from kvcompress.slots import FILLER  # noqa: E402

SETTINGS = {"sink": 4, "window": 8, "block_size": 4}


def tiny_gates(model) -> GateCompressor:
    ids = torch.randint(3, VOCAB, (5 * 128,), generator=torch.Generator().manual_seed(4))
    inv_freq = rope_inv_freq(model)
    labels = collect_retention_labels(model, ids, inv_freq, window=8, sink=4, threshold=0.05, sequence_length=128, min_future=16)
    with torch.enable_grad():
        gates, probabilities, _ = train_gates(labels, hidden=16, steps=30, batch=64, evaluate_every=10)
    return GateCompressor.from_gates(gates, probabilities, inv_freq, {"base_model": model_signature(model, "tiny"), "cache": SETTINGS})


@pytest.fixture(scope="module")
def gated():
    model = tiny_model("llama")
    return model, tiny_gates(model)


@pytest.mark.parametrize("allocation", ["shared", "equal"])
@pytest.mark.parametrize("policy", ["head", "layer"])
def test_thresholds_keep_the_asked_share_of_held_out_tokens(policy, allocation):
    probabilities = torch.rand(3, 4, 2000, generator=torch.Generator().manual_seed(5)) ** torch.arange(1.0, 5.0)[:, None]  # heads differ
    thresholds = fitted_thresholds(probabilities, 0.1, policy, allocation)
    kept = probabilities >= thresholds[..., None]
    if policy == "head":
        rates = kept.float().mean()[None] if allocation == "shared" else kept.float().mean(-1)
    else:
        rates = kept.any(1).float().mean(-1)
    assert torch.allclose(rates, torch.full_like(rates, 0.1), atol=0.005)
    per_head = kept.float().mean(-1)
    if allocation == "shared":  # one probability threshold per layer: heads whose gates say "keep" more often keep more
        assert torch.equal(thresholds, thresholds[:, :1].expand_as(thresholds))
        assert bool((per_head[:, 0] > per_head[:, 3]).all())
    else:
        assert torch.allclose(per_head, per_head[:, :1].expand_as(per_head), atol=0.005)


def test_an_unknown_allocation_is_refused(gated):
    with pytest.raises(ValueError, match="Unknown allocation 'fair'; choose from shared, equal"):
        GatedCache(gated[1], 0.2, allocation="fair")


def test_the_global_union_is_refused(gated):
    """A union over every layer is decided only once the last layer has seen a block, so earlier layers held dense memory
    until then and a row's eviction followed the other rows' blocks; measured worse than per head on every metric, it is gone."""
    with pytest.raises(ValueError, match="Unknown retention policy 'global'; choose from head, layer"):
        GatedCache(gated[1], 0.2, policy="global")


@pytest.mark.parametrize("policy", ["head", "layer"])
def test_keeping_everything_equals_dense(gated, policy):
    model, compressor = gated
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, GatedCache(compressor, 1.0, policy=policy), ids), greedy(model, DynamicCache(), ids))


def _held(layer):
    return [[sorted(int(t) for t in layer.table_token_ids()[0, head] if t != FILLER) for head in range(2)]]


def test_per_head_policy_keeps_exactly_the_tokens_each_gate_lets_through(gated):
    model, compressor = gated
    cache = GatedCache(compressor, 0.3)
    greedy(model, cache, prompt_ids(60), new_tokens=20)
    layer = cache.layers[1]
    # The prompt's keys are computed in one exact prefill: recompute their gate probabilities from a dense run.
    handed = min(int(layer.handed[0]), 60 - 4)
    probabilities = _probabilities_of_prompt_keys(model, compressor, 1, prompt_ids(60), 4, handed)
    thresholds = compressor.thresholds(0.3)[1]
    held = _held(layer)[0]
    for head in range(2):
        expected = [4 + i for i in range(handed) if probabilities[head, i] >= thresholds[head]]
        middle = [t for t in held[head] if 4 <= t < 4 + handed]
        assert middle == expected and 0 < len(expected) < handed
    assert held[0] != held[1]  # heads keep their own tokens
    assert cache.nbytes() < 0.7 * cache.dense_nbytes()


def test_the_layer_union_keeps_the_same_tokens_across_heads(gated):
    model, compressor = gated
    cache = GatedCache(compressor, 0.3, policy="layer")
    greedy(model, cache, prompt_ids(60), new_tokens=20)
    for layer in cache.layers:
        heads = _held(layer)[0]
        assert heads[0] == heads[1] and len(heads[0]) < 60 + 20 - 1


def test_the_hard_cap_bounds_each_heads_store(gated):
    model, compressor = gated
    cache = GatedCache(compressor, 1.0, max_tokens=5)
    greedy(model, cache, prompt_ids(60), new_tokens=20)
    for layer in cache.layers:
        assert int((layer.store["token_ids"] != FILLER).sum(-1).max()) <= 5


def test_a_left_padded_batch_matches_each_row_alone(gated):
    model, compressor = gated
    assert_left_padded_batch_matches_rows(model, lambda: GatedCache(compressor, 0.3), length=40, padding=6, new_tokens=16)


def test_gate_artifacts_round_trip_and_refuse_bad_settings(gated, tmp_path):
    model, compressor = gated
    compressor.save_pretrained(tmp_path)
    loaded = GatedCache.from_pretrained(tmp_path, keep_ratio=0.3)
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, loaded, ids), greedy(model, GatedCache(compressor, 0.3), ids))
    assert GatedCache.from_pretrained(tmp_path).compressor is loaded.compressor
    assert GatedCache.from_pretrained(tmp_path).keep_ratio == compressor.default_keep_ratio == 0.125  # from_gates' default
    with pytest.raises(ValueError, match="Unknown retention policy 'heads'"):
        GatedCache(compressor, 0.3, policy="heads")
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\]"):
        GatedCache(compressor, 1.5)
    with pytest.raises(ValueError, match="max_tokens must be a positive number"):
        GatedCache(compressor, 0.3, max_tokens=0)
    from kvcompress.lowrank import PCACache

    with pytest.raises(Exception, match="load it with GatedCache"):
        PCACache.from_pretrained(tmp_path)


def test_gates_calibrated_at_a_keep_ratio_keep_it_when_loaded_without_options(gated, tmp_path):
    """What the calibration measured is what a user gets: the keep ratio it was checked at goes with the artifact, for
    GatedCache and for a composition; an artifact saved before it was recorded keeps 0.125; options still win."""
    model, compressor = gated
    half = GateCompressor(compressor.config | {"gates": compressor.config["gates"] | {"keep_ratio": 0.5}}, compressor.tensors)
    half.save_pretrained(tmp_path / "half")
    assert GatedCache.from_pretrained(tmp_path / "half").keep_ratio == 0.5
    assert GatedCache.from_pretrained(tmp_path / "half", keep_ratio=0.3).keep_ratio == 0.3
    assert ComposedCache(gate=half, bits=8).keep_ratio == 0.5
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, GatedCache(half), ids), greedy(model, GatedCache(compressor, 0.5), ids))
    older = GateCompressor(compressor.config | {"gates": {"hidden": compressor.config["gates"]["hidden"]}}, compressor.tensors)
    assert GatedCache(older).keep_ratio == 0.125
    with pytest.raises(ConfigError, match="gates.keep_ratio is 1.5; it must be a finite number from 0 to 1"):
        GateCompressor(compressor.config | {"gates": compressor.config["gates"] | {"keep_ratio": 1.5}}, compressor.tensors)


@pytest.mark.parametrize(
    "shape, seed, settings",
    [((4, 8, 32), 10, {"keep_ratio": 0.3, "allocation": "equal"}), ((2, 16, 64), 3, {"keep_ratio": 0.5, "max_tokens": 3}), ((2, 16, 64), 10, {"keep_ratio": 0.5, "max_tokens": 3})],
)
def test_a_batch_decides_like_its_rows_when_a_token_repeats_a_calibration_token(shape, seed, settings):
    """A layer's first keys depend on the token alone: a repeated token scores the same probability, up to the model's rounding,
    which differs between a batch and its rows. Thresholds halfway between held-out probabilities and scores on a 1/4096 grid
    make the decision the same (these cases once differed)."""
    heads, head_dim, hidden = shape
    model = tiny_model("llama", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, num_hidden_layers=1)
    gates = tiny_gates(model)

    def make():
        return GatedCache(gates, sink=0, window=0, block_size=1, **settings)

    ids = prompt_ids(20, batch=2, seed=seed)
    together = greedy(model, make(), ids, new_tokens=11)
    for row in range(2):
        assert torch.equal(together[row], greedy(model, make(), ids[row : row + 1], new_tokens=11)[0])


def _probabilities_of_prompt_keys(model, compressor, layer_idx, ids, first, count):
    """The gate probabilities (on the policy's 1/4096 grid) of prompt tokens first..first+count, from a dense run."""
    dense = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(dense))
    keys = dense.layers[layer_idx].keys[:, :, first : first + count]
    return compressor.probabilities(layer_idx, keys, torch.arange(first, first + count, device=keys.device)[None])[0].cpu()


def test_a_ratio_fills_each_heads_budget_with_its_most_probable_tokens(gated):
    """``ratio=`` is a budget: each head of a layer holds as many old tokens as the budget gives the layer, the ones its gate
    scores highest (newest first among equals), so no head's room is left to fillers."""
    model, compressor = gated
    cache = GatedCache(compressor, ratio=2, context=64)
    ids = prompt_ids(64)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    budget, rooms = cache.keep.target, []
    for layer in cache.layers:
        handed = int(layer.handed[0])
        room = int(budget.tokens(layer.layer_idx, layer.seen, layer.settings)[0])
        probabilities = _probabilities_of_prompt_keys(model, compressor, layer.layer_idx, ids, 4, handed)
        for head, held in enumerate(_held(layer)[0]):
            ranked = sorted(range(handed), key=lambda i: (-float(probabilities[head, i]), -i))
            assert [t for t in held if 4 <= t < 4 + handed] == sorted(4 + i for i in ranked[:room])
        assert 0 < room < handed
        rooms.append(room)
    assert len(set(rooms)) > 1  # layers get the room their gates want
    shares = torch.tensor([float(budget.share[layer.layer_idx]) for layer in cache.layers])
    assert shares.mean() == pytest.approx(1.0)


def test_a_ratio_holds_its_budget_while_generating_and_one_keeps_everything(gated):
    model, compressor = gated
    cache = GatedCache(compressor, ratio=2, context=64, policy="layer")
    greedy(model, cache, prompt_ids(50), new_tokens=60)
    for layer in cache.layers:
        held = _held(layer)[0]
        assert held[0] == held[1]  # the layer policy ranks a token by its best head: every head keeps the same ones
        stored, budget = int((layer.store["token_ids"] != FILLER).sum(-1).max()), cache.keep.target
        block = layer.settings.block_size  # the store was last filled at most a block ago
        assert int(budget.tokens(layer.layer_idx, layer.seen - block, layer.settings)[0]) <= stored <= int(budget.tokens(layer.layer_idx, layer.seen, layer.settings)[0])
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, GatedCache(compressor, ratio=1), ids), greedy(model, DynamicCache(), ids))


@given(ratio=st.floats(1.5, 32.0), context=st.integers(512, 1 << 15), seen=st.lists(st.integers(0, 1 << 16), min_size=2, max_size=8),
       merged=st.sampled_from([0.0, 1 / 64, 1 / 32, 1 / 8]))
def test_a_gate_budget_grows_with_the_tokens_seen_and_meets_its_ratio_from_its_context_on(ratio, context, seen, merged):
    """Also with merged slots in it (keep-and-merge): every layer holds them in full, and the layers' shares split the rest."""
    settings = CacheSettings(sink=4, window=64, block_size=16)
    exact = 4 + 64 + 15  # and a block's slack
    if context / ratio <= exact or kept_share(ratio, context, exact) <= merged:
        return
    budget = GateBudget(ratio, kept_share(ratio, context, exact), torch.tensor([0.5, 1.5]), merged)
    seen = torch.tensor(sorted(seen))
    for layer in (0, 1):
        tokens = budget.tokens(layer, seen, settings)
        assert bool((tokens.diff() >= 0).all()) and bool((tokens >= 0).all())  # a token that left never has to come back
        assert bool((tokens >= (merged * (seen - exact).clamp(min=0)).floor()).all())  # the merged slots fit in every layer
    total = budget.tokens(0, seen, settings) + budget.tokens(1, seen, settings)  # two layers: on average one budget each
    past = seen >= context
    assert bool((total[past] <= 2 * (seen[past] / ratio - exact) + 2).all())
    assert bool((total[past] >= 2 * (seen[past] / ratio - exact) - 2).all())


@pytest.mark.parametrize("available, asked", [(700, 10_000), (1400, 10_000), (1400, 600), (3000, 2000)])
def test_the_tokens_a_calibration_records_are_the_tokens_its_labels_read(available, asked):
    """A corpus shorter than --gate-tokens, or not a whole number of sequences: the count recorded in the artifact is what was read."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (available,), generator=torch.Generator().manual_seed(0))
    labels = collect_retention_labels(model, ids, rope_inv_freq(model), window=16, sink=4, sequence_length=256, min_future=16, max_tokens=asked)
    assert (int(labels.sequence.max()) + 1) * 256 == labelled_tokens(available, asked, sequence_length=256)


def test_gates_whose_labels_have_one_class_or_that_score_near_chance_are_reported():
    assert _gate_warnings({"mean_positive_rate": 0.12, "median_auc": 0.91}, 0.02) == []
    assert "no calibration token reached the label threshold (0.02" in _gate_warnings({"mean_positive_rate": 0.0, "median_auc": float("nan")}, 0.02)[0]
    assert "raise --label-threshold" in _gate_warnings({"mean_positive_rate": 1.0, "median_auc": float("nan")}, 0.02)[0]
    assert "nothing to tell apart" in _gate_warnings({"mean_positive_rate": 0.3, "median_auc": float("nan")}, 0.02)[0]
    assert "little better than chance (median AUC 0.51" in _gate_warnings({"mean_positive_rate": 0.12, "median_auc": 0.5115}, 0.02)[0]

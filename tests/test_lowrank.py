"""PCACache and KVSpliceCache on tiny random models: exactness at full rank, real memory savings,
heterogeneous ranks, padding, artifacts and their errors."""

import functools
import json

import huggingface_hub
import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, assert_layers_equal, assert_left_padded_batch_matches_rows, greedy, prompt_ids, reseal, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvcompress import ComposedCache, CompressedCache, H2OCache, StreamingLLMCache, cache_kwargs
from kvcompress.cache import CompressedLayer
from kvcompress.calibration.calibrate import LowRankCalibration
from kvcompress.config import ConfigError, HeadRanks, RankConfig
from kvcompress.hub import CONFIG_FILE, WEIGHTS_FILE
from kvcompress.lowrank import KVSpliceCache, PCACache
from kvcompress.models import kv_shape
from kvcompress.policies import KeepPolicy

SETTINGS = {"sink": 4, "window": 8, "block_size": 4}


def calibrate(model, fisher_sequences: int = 0) -> LowRankCalibration:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1536,), generator=generator)
    heldout = torch.randint(3, VOCAB, (1, 96), generator=generator)
    return LowRankCalibration.from_token_ids(
        model, ids, heldout, samples=384, tokens=1536, sequence_length=128, fisher_sequences=fisher_sequences, fisher_sequence_length=128, name_or_path="tiny",
    )


def uniform(model, rank_k: int, rank_v: int | None = None, algo: str = "pca") -> RankConfig:
    layers, heads, dim = kv_shape(model.config)
    return RankConfig.uniform(layers, heads, dim, dim, rank_k, rank_v, algo=algo)


def fitted(model, rank_k: int, rank_v: int | None = None, method: str = "pca"):
    return calibrate(model).fit(method, uniform(model, rank_k, rank_v, method), SETTINGS)[0]


@torch.no_grad()
def stream_logits(model, cache, ids):
    logits = [model(input_ids=ids[:, :24], **cache_kwargs(cache)).logits]
    for position in range(24, ids.shape[1]):
        logits.append(model(input_ids=ids[:, position : position + 1], **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_rank_pca_equals_dense(arch):
    model = tiny_model(arch)
    ids = prompt_ids(48)
    compressed = PCACache(fitted(model, 16))
    assert torch.allclose(stream_logits(model, compressed, ids), stream_logits(model, DynamicCache(), ids), atol=1e-4)
    assert compressed.layers[0].store_length > 20  # the tokens really went through the latents


def test_error_grows_as_rank_shrinks():
    model = tiny_model("llama")
    ids = prompt_ids(48)
    dense = stream_logits(model, DynamicCache(), ids)
    calibration = calibrate(model)
    errors = [
        float((stream_logits(model, PCACache(calibration.fit("pca", uniform(model, rank), SETTINGS)[0]), ids) - dense).abs().max())
        for rank in (4, 10, 16)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_store_holds_only_latents_and_the_memory_saving_is_real():
    model = tiny_model("llama")
    cache = PCACache(fitted(model, 4, 8))
    greedy(model, cache, prompt_ids(60), new_tokens=40)
    layer = cache.layers[0]
    stored = layer.store_length
    assert set(layer.store) == {"key_latents", "value_latents", "token_ids"}  # no full keys or values are kept
    assert layer.store["key_latents"].shape == (1, 1, stored, 2 * 4) and layer.store["value_latents"].shape == (1, 1, stored, 2 * 8)
    tail, stored = layer.tail_capacity(), layer.store_capacity()  # the room to grow is counted too
    expected = stored * (2 * 4 + 2 * 8) * 4 + stored * 2 * 4 + tail * 2 * (16 + 16 + 1) * 4 + 2 * 8  # latents, store ids, exact tail and its room, row counters
    assert layer.nbytes() == expected
    assert cache.nbytes() < 0.55 * cache.dense_nbytes()


def test_heterogeneous_ranks_per_head_and_for_keys_and_values():
    model = tiny_model("qwen3")
    ranks = uniform(model, 8)
    ranks.heads[0, 0] = HeadRanks(2, 14)
    ranks.heads[1, 1] = HeadRanks(16, 16, enabled=False)
    compressor = calibrate(model).fit("pca", ranks, SETTINGS)[0]
    cache = PCACache(compressor)
    out = greedy(model, cache, prompt_ids(40), new_tokens=16)
    assert out.shape == (1, 16)
    assert cache.layers[0].store["key_latents"].shape[-1] == 2 + 8
    assert cache.layers[0].store["value_latents"].shape[-1] == 14 + 8
    assert cache.layers[1].store["key_latents"].shape[-1] == 8 + 16
    assert torch.allclose(compressor.tensors["layers.1.heads.1.key.decoder"], torch.eye(16))  # a disabled head stays exact


def test_left_padded_batch_matches_each_row_alone():
    model = tiny_model("mistral")
    compressor = fitted(model, 6, 10)
    assert_left_padded_batch_matches_rows(model, lambda: PCACache(compressor), length=40, padding=7, new_tokens=20)


@functools.cache
def pca_6_8():
    """One fitted artifact for the tests below that only need some low-rank compressor (the tiny model is the same each time)."""
    return fitted(tiny_model("llama"), 6, 8)


def in_place_and_general(monkeypatch, make, ids, attention_mask=None, new_tokens=30):
    """Generate with a cache from `make` as the engine runs, recording whether each block step ran in place, then with one
    whose block steps all take the general path; returns both caches, their tokens and the record."""
    ran, in_place = [], CompressedLayer._hand_blocks_in_place
    monkeypatch.setattr(CompressedLayer, "_hand_blocks_in_place", lambda layer: ran.append(in_place(layer)) or ran[-1])
    model = tiny_model("llama")
    quick = make(model)
    quick_tokens = greedy(model, quick, ids, attention_mask, new_tokens=new_tokens)
    monkeypatch.setattr(CompressedLayer, "_hand_blocks_in_place", lambda layer: False)
    general = make(model)
    return quick, general, quick_tokens, greedy(model, general, ids, attention_mask, new_tokens=new_tokens), ran


def assert_slot_for_slot(quick, general):
    assert_layers_equal(quick, general)
    for a, b in zip(quick.layers, general.layers, strict=True):
        assert (a.store_length, a.tail_length) == (b.store_length, b.tail_length)
        assert torch.equal(a.handed, b.handed) and a.has_fillers == b.has_fillers


@pytest.mark.parametrize(
    "make",
    [
        lambda model: PCACache(pca_6_8()),
        lambda model: ComposedCache(lowrank=pca_6_8(), bits=4, group_size=4),
        lambda model: ComposedCache(bits=8, group_size=8, **SETTINGS),
    ],
    ids=["pca", "pca int4", "int8"],
)
def test_blocks_handed_without_a_sync_equal_the_general_path(monkeypatch, make):
    quick, general, quick_tokens, general_tokens, ran = in_place_and_general(monkeypatch, make, prompt_ids(60, batch=2))
    assert ran.count(True) == len(ran) >= 2 * 8  # every block step of both layers (the prefill's and 7 of 4 tokens) took the path without syncs
    assert quick.layers[0].store_length >= 72  # and stored blocks: 90 tokens, a sink of 4 and a window of 8 exact
    assert torch.equal(quick_tokens, general_tokens)
    assert_slot_for_slot(quick, general)


@settings(max_examples=10, deadline=None)
@given(window=st.integers(1, 20), block_size=st.integers(1, 9), sink=st.integers(0, 5), length=st.integers(2, 70), new_tokens=st.integers(1, 25), batch=st.integers(1, 3))
def test_blocks_handed_without_a_sync_equal_the_general_path_at_any_settings(window, block_size, sink, length, new_tokens, batch):
    with pytest.MonkeyPatch.context() as monkeypatch:
        make = lambda model: PCACache(pca_6_8(), window=window, block_size=block_size, sink=sink)  # noqa: E731
        quick, general, quick_tokens, general_tokens, ran = in_place_and_general(monkeypatch, make, prompt_ids(length, batch=batch), new_tokens=new_tokens)
    assert ran and all(ran) and torch.equal(quick_tokens, general_tokens)
    assert_slot_for_slot(quick, general)


def test_only_caches_that_store_every_token_as_it_is_and_aligned_rows_skip_the_general_path(monkeypatch):
    class Choosy(KeepPolicy):
        def choose(self, layer, blocks):
            return blocks

    pca = pca_6_8()
    takes = {
        "pca": PCACache(pca), "pca int8": ComposedCache(lowrank=pca, bits=8), "int8": ComposedCache(bits=8),
        "plain store": CompressedCache(), "h2o": H2OCache(budget=24), "streamingllm": StreamingLLMCache(budget=24),
        "a policy's own choice": CompressedCache(keep=Choosy(), encoding=ComposedCache(lowrank=pca).encoding),
    }
    assert {name: cache.layer(0).stores_every_token for name, cache in takes.items()} == {
        "pca": True, "pca int8": True, "int8": True, "plain store": False, "h2o": False, "streamingllm": False, "a policy's own choice": False,
    }
    ids = prompt_ids(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: rows hold different tokens, and fillers
    *_, ran = in_place_and_general(monkeypatch, lambda model: PCACache(pca_6_8()), ids, mask, new_tokens=12)
    assert ran and not any(ran)


def test_kvsplice_improves_the_attention_output_over_pca_and_runs_under_generate():
    model = tiny_model("llama")
    calibration = calibrate(model)
    compressor, metrics = calibration.fit("kvsplice", uniform(model, 4, 6, "kvsplice"), SETTINGS)
    assert metrics["heads_improved_over_pca"] > 0
    assert metrics["validation_attention_error"] < metrics["validation_attention_error_pca"]
    assert greedy(model, KVSpliceCache(compressor), prompt_ids(40), new_tokens=8).shape == (1, 8)


def test_fisher_information_and_fisher_ranks():
    model = tiny_model("llama")
    calibration = calibrate(model, fisher_sequences=2)
    fisher = calibration.fisher
    assert fisher.keys.shape == (4, 16, 16) and fisher.values.shape == (4, 16, 16)
    assert float(torch.linalg.eigvalsh(fisher.keys.double()).min()) > -1e-12 and float(fisher.values.diagonal(dim1=1, dim2=2).sum()) > 0
    summary = fisher.summary(num_heads=2)
    assert set(summary) == {"0/0", "0/1", "1/0", "1/1"} and summary["1/1"]["cond_v"] >= 1
    ranks, source = calibration.ranks(uniform(model, 16), 0.5)
    assert source == "fisher" and ranks.memory_fraction() == 0.5
    # A group whose values the loss is 1000x more sensitive to gets more value rank.
    fisher.values[2] *= 1000
    boosted = calibration.ranks(uniform(model, 16), 0.5)[0]
    assert boosted.heads[1, 0].value > ranks.heads[1, 0].value and boosted.memory_fraction() == 0.5


def test_save_and_load_round_trip_shares_weights(tmp_path):
    model = tiny_model("llama")
    compressor = fitted(model, 6, 10)
    compressor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["method"] == "pca" and config["format_version"] == 1 and config["base_model"]["num_kv_heads"] == 2
    assert "PCACache.from_pretrained" in (tmp_path / "README.md").read_text()
    first, second = PCACache.from_pretrained(tmp_path), PCACache.from_pretrained(str(tmp_path))
    assert first.compressor is second.compressor  # loaded once, shared by every cache
    ids = prompt_ids(40)
    assert torch.equal(greedy(model, first, ids), greedy(model, PCACache(compressor), ids))
    assert first.settings.window == 8  # cache settings travel with the artifact


def test_artifact_errors(tmp_path, monkeypatch):
    model = tiny_model("llama")
    fitted(model, 6).save_pretrained(tmp_path / "pca")
    with pytest.raises(FileNotFoundError, match="is not a compressor directory"):
        PCACache.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a relative path that does not exist looks like a repo id
    with pytest.raises(FileNotFoundError, match=r"is not a local directory .* the Hub was not reachable \(HF_HUB_OFFLINE is set\)") as refused:
        PCACache.from_pretrained("results/no-such-run")
    assert "Did you mean" not in str(refused.value) and "kvcompress pretrained` lists" in str(refused.value)
    with pytest.raises(FileNotFoundError, match="Did you mean kvcompress/smollm2-135m-instruct-pca-2x?"):  # a shipped id, mistyped
        PCACache.from_pretrained("kvcompress/smollm2-135m-instruct-pca-2")
    with pytest.raises(ConfigError, match="load it with PCACache"):
        KVSpliceCache.from_pretrained(tmp_path / "pca")

    def variant(name, edit):
        target = tmp_path / name
        target.mkdir()
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            (target / file).write_bytes((tmp_path / "pca" / file).read_bytes())
        edit(target)
        return target

    missing = variant("missing", lambda d: (d / WEIGHTS_FILE).unlink())
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        PCACache.from_pretrained(missing)
    corrupt = variant("corrupt", lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"))
    with pytest.raises(ConfigError, match="does not match the checksum"):
        PCACache.from_pretrained(corrupt)
    reseal(corrupt)  # consistently written, yet not safetensors
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        PCACache.from_pretrained(corrupt)

    def edit_config(change):
        def edit(directory):
            config = json.loads((directory / CONFIG_FILE).read_text())
            change(config)
            reseal(directory, config)
        return edit

    newer = variant("newer", edit_config(lambda c: c.update(format_version=99)))
    with pytest.raises(ConfigError, match="newer than this kvcompress reads"):
        PCACache.from_pretrained(newer)
    mismatched = variant("mismatched", edit_config(lambda c: c["ranks"]["per_layer_head"]["1/0"].update(rank=3)))
    with pytest.raises(ConfigError, match=r"layers.1.heads.0.key.encoder is \(16, 6\), its config says \(16, 3\)"):
        PCACache.from_pretrained(mismatched)


def test_a_compressor_for_another_model_is_refused():
    compressor = fitted(tiny_model("llama"), 6)
    other_weights = tiny_model("llama")
    torch.nn.init.normal_(other_weights.model.layers[0].self_attn.k_proj.weight)
    with pytest.raises(ValueError, match=r"fitted for tiny \(llama\), not for this model: layer 0 k_proj"):
        greedy(other_weights, PCACache(compressor), prompt_ids(20), new_tokens=2)
    same_keys_and_values = tiny_model("llama")  # only the queries' projection differs: the keys' statistics still do not hold
    torch.nn.init.normal_(same_keys_and_values.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="layer 1 q_proj weight norm"):
        greedy(same_keys_and_values, PCACache(compressor), prompt_ids(20), new_tokens=2)
    other_architecture = tiny_model("qwen2")  # the same shapes
    with pytest.raises(ValueError, match=r"fitted for tiny \(llama\), not for this model: its model_type 'qwen2' \(fitted: 'llama'\)\. Use"):
        greedy(other_architecture, PCACache(compressor), prompt_ids(20), new_tokens=2)
    more_query_heads = tiny_model("llama", num_attention_heads=8, head_dim=16)  # the same KV heads and head dim
    with pytest.raises(ValueError, match=r"not for this model: its num_attention_heads 8 \(fitted: 4\)\. Use"):
        greedy(more_query_heads, PCACache(compressor), prompt_ids(20), new_tokens=2)
    other_shape = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="2 KV heads of dim 16\\) but layer 0 of this model has 4 KV heads"):
        greedy(other_shape, PCACache(compressor), prompt_ids(20), new_tokens=2)


def test_a_cache_refuses_the_other_methods_compressor():
    with pytest.raises(TypeError, match="KVSpliceCache needs a KVSpliceCompressor, got PCACompressor"):
        KVSpliceCache(fitted(tiny_model("llama"), 6))


SEED_EXAMPLE = {
    "global": {"target_memory_reduction": 0.5, "d_head": 16, "algo_default": "kvsplice", "rank": 8},
    "per_layer_head": {"0/0": {"enabled": True, "rank": 4, "algo": "kvsplice", "d_k": 16, "d_v": 16}, "0/1": {"enabled": False}},
}


def test_rank_config_in_the_seed_shape():
    ranks = RankConfig.from_json(SEED_EXAMPLE, 2, 2, 16, 16)
    assert ranks.heads[0, 0] == HeadRanks(4, 4, True, "kvsplice")
    assert ranks.heads[0, 1] == HeadRanks(16, 16, False, "kvsplice")
    assert ranks.heads[1, 1] == HeadRanks(8, 8, True, "kvsplice")  # left out: the global rank
    assert RankConfig.from_json(ranks.to_json(), 2, 2, 16, 16) == ranks


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["per_layer_head"]["0/0"].update(rank=17), r"per_layer_head\['0/0'\].rank must be an integer from 1 to 16"),
        (lambda c: c["per_layer_head"]["0/0"].update(rank_k=2), r"per_layer_head\['0/0'\] gives both 'rank' and 'rank_k'"),
        (lambda c: c["per_layer_head"]["0/0"].update(algo="svd"), r"per_layer_head\['0/0'\].algo is 'svd'"),
        (lambda c: c["per_layer_head"]["0/0"].update(d_k=64), r"per_layer_head\['0/0'\].d_k is 64 but the model's heads have 16"),
        (lambda c: c["per_layer_head"]["0/0"].update(enabled="yes"), r"per_layer_head\['0/0'\].enabled must be true or false"),
        (lambda c: c["per_layer_head"]["0/0"].update(ranks=3), r"per_layer_head\['0/0'\] has unknown field\(s\) \['ranks'\]"),
        (lambda c: c["per_layer_head"].update({"5/0": {"rank": 2}}), r"per_layer_head\['5/0'\] is outside the model"),
        (lambda c: c["per_layer_head"].update({"first": {"rank": 2}}), "must look like 'layer/head'"),
        (lambda c: c["global"].pop("rank"), r"no entry for 2 head\(s\) \(first: '1/0'\)"),
        (lambda c: c["global"].update(target_memory_reduction=2), "global.target_memory_reduction must be a fraction"),
        (lambda c: c.update(layers={}), r"Unknown top-level field\(s\) \['layers'\]"),
    ],
)
def test_invalid_rank_configs_name_the_field(edit, message):
    config = json.loads(json.dumps(SEED_EXAMPLE))
    edit(config)
    with pytest.raises(ConfigError, match=message):
        RankConfig.from_json(config, 2, 2, 16, 16)


def test_the_evaluator_builds_fitted_caches_from_their_directories(tmp_path):
    from kvcompress.evaluation.harness import CacheSpec

    fitted(tiny_model("llama"), 6).save_pretrained(tmp_path / "run-a")
    spec = CacheSpec.fitted(tmp_path / "run-a")
    assert spec.label == "pca run-a" and isinstance(spec.build(), PCACache)
    with pytest.raises(FileNotFoundError, match="has no compressor_config.json: it is not a complete kvcompress compressor directory"):
        CacheSpec.fitted(tmp_path)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rank", "8", "--target-memory-reduction", "0.5"], "cannot be combined"),
        (["--rank", "8", "--config", "ranks.json"], "cannot be combined"),
        ([], "give --rank R, --target-memory-reduction F or --config FILE"),
        (["--target-memory-reduction", "0.5", "--rank-v", "8"], "--rank-v needs --rank"),
    ],
)
def test_calibrate_refuses_conflicting_rank_options(arguments, message, capsys, tmp_path):
    from kvcompress.calibration.cli import main

    (tmp_path / "ranks.json").write_text("{}")
    arguments = [str(tmp_path / argument) if argument == "ranks.json" else argument for argument in arguments]
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--method", "pca", "--output", str(tmp_path / "unused"), *arguments])
    assert exit_.value.code == 2 and message in capsys.readouterr().err

"""SidecarCache mechanics on tiny models: trajectories and their forces, the network, the losses, the cache and its artifacts."""

import copy
import dataclasses

import pytest
import torch
from conftest import VOCAB, assert_left_padded_batch_matches_rows, cache_kwargs, greedy, prompt_ids, tiny_model
from safetensors.torch import load_file
from test_gates import tiny_gates
from transformers import DynamicCache

from kvcompress import ConfigError, SidecarCache, SidecarCompressor
from kvcompress.attention_matching import attention_matching_merge
from kvcompress.calibration.sidecar import (
    DROPPED,
    KeptByGates,
    LossWeights,
    StretchAttention,
    TrainingSettings,
    merge_stretches,
    reference_queries,
    sample_stretches,
    step_losses,
    train_sidecar,
    training_warnings,
    unhealthy,
)
from kvcompress.calibration.trajectories import collect_trajectories, default_directory, load_trajectories, trajectory_settings
from kvcompress.hub import model_signature
from kvcompress.rope import rope_inv_freq, rotate, to_window_frame, window_frame_references
from kvcompress.sidecar import SidecarNetwork
from kvcompress.slots import FILLER, SYNTHESIZED

LENGTH = 128  # trajectory sequence length for the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, its trajectories (3 sequences) and an untrained 8:2 sidecar artifact."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (3 * LENGTH,), generator=torch.Generator().manual_seed(7))
    directory = tmp_path_factory.mktemp("trajectories")
    data = collect_trajectories(model, ids, directory, sequences=3, sequence_length=LENGTH, query_positions=32, first_query=16)
    return model, ids, directory, data


def _network(window=8, slots=2):
    return SidecarNetwork(2, 2, 16, window, slots, width=32, encoder_layers=1, attention_heads=2, inducing_points=4)


def untrained_sidecar(model, window: int = 8, slots: int = 2) -> SidecarCompressor:
    """A `window`:`slots` sidecar artifact for a tiny model (2 layers, 2 KV heads, head_dim 16) without trajectories: an untrained
    network (attention matching) and random references."""
    config = {"base_model": model_signature(model, "tiny"), "cache": {"sink": 4, "window": 8}}
    references = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    return SidecarCompressor.from_network(_network(window, slots), references, torch.arange(1.0, 17.0), rope_inv_freq(model), config)


def _references(model, data):
    return reference_queries(data, rope_inv_freq(model), count=16, recent_window=8)


def _compressor(model, data, window=8, slots=2, network=None):
    config = {"base_model": model_signature(model, "tiny"), "cache": {"sink": 4, "window": 8}}
    references = _references(model, data)
    return SidecarCompressor.from_network(network or _network(window, slots), references.queries, references.offsets, rope_inv_freq(model), config)


def test_forces_are_the_attention_jacobian_applied_to_the_output_gradient(tiny):
    model, _, _, data = tiny
    assert (data.sequences, data.num_layers, data.num_heads) == (3, 2, 2)
    part = data.layer(2, 1)
    assert part["keys"].shape == (2, LENGTH, 16) and part["queries"].shape == (4, 32, 16) and part["forces"].abs().sum() > 0
    assert bool((part["positions"] >= 16).all())
    # dL/dq = J^T dL/dy: recompute J^T dL/dy from the stored keys, values and query, for a few queries.
    for sequence, layer, head, index in ((0, 0, 0, 3), (1, 1, 3, 20), (2, 1, 2, 31)):
        part = data.layer(sequence, layer)
        position = int(part["positions"][index])
        keys, values = (part[name][head // 2, : position + 1].float() for name in ("keys", "values"))
        with torch.enable_grad():  # other tests may have turned gradients off globally (the CLI does)
            query = part["queries"][head, index].float().requires_grad_(True)
            output = torch.softmax(query @ keys.T / 4, -1) @ values
            (force,) = torch.autograd.grad((output * part["output_grads"][head, index]).sum(), query)
        assert torch.allclose(force, part["forces"][head, index], rtol=2e-2, atol=1e-4 * float(force.abs().max()))


def test_reference_queries_read_one_sequence_at_a_time_pick_what_the_whole_collection_gives(tiny):
    """The shards are read a sequence at a time; the references are those picked from all shards stacked in memory."""
    model, _, directory, data = tiny
    inv_freq = rope_inv_freq(model)
    stacked = [load_file(str(shard)) for shard in data.shards]
    queries, positions = torch.stack([shard["queries"] for shard in stacked]), torch.stack([shard["positions"] for shard in stacked])
    sequences, layers, heads, count, dim = queries.shape
    flat = queries.permute(1, 2, 0, 3, 4).reshape(layers, heads, sequences * count, dim).float()
    grouped = rotate(flat, positions.reshape(-1)[None].expand(layers, -1), inv_freq, inverse=True).view(layers, data.num_heads, -1, dim)
    pick = torch.randperm(grouped.shape[2], generator=torch.Generator().manual_seed(3))[:20]
    references = reference_queries(data, inv_freq, count=20, seed=3)
    assert references.queries.shape == (layers, data.num_heads, 20, dim)
    assert torch.allclose(references.queries, grouped[:, :, pick], atol=1e-6)


def test_collection_resumes_and_refuses_other_settings_or_budgets(tiny, tmp_path):
    model, ids, directory, _ = tiny
    shards = sorted(directory.glob("sequence-*.safetensors"))
    stamps = [shard.stat().st_mtime_ns for shard in shards]
    shards[1].write_bytes(b"not a safetensors file")  # an interrupted copy is collected again
    collect_trajectories(model, ids, directory, sequences=3, sequence_length=LENGTH, query_positions=32, first_query=16)
    assert [shard.stat().st_mtime_ns for shard in shards][::2] == stamps[::2]
    assert load_trajectories(directory).sequences == 3
    with pytest.raises(ValueError, match="other settings \\(query_positions differ\\)"):
        collect_trajectories(model, ids, directory, sequences=3, sequence_length=LENGTH, query_positions=16, first_query=16)
    collect_trajectories(model, ids, tmp_path / "recall", sequences=1, sequence_length=LENGTH, query_positions=8, source="recall sequences")
    with pytest.raises(ValueError, match="other settings \\(source differ\\)"):  # a key only the old manifest has is named too
        collect_trajectories(model, ids, tmp_path / "recall", sequences=1, sequence_length=LENGTH, query_positions=8)
    with pytest.raises(ValueError, match="over the disk budget"):
        collect_trajectories(model, ids, tmp_path / "small", sequences=3, sequence_length=LENGTH, query_positions=32, disk_budget_gb=1e-4)
    with pytest.raises(ValueError, match="Too little calibration data"):
        collect_trajectories(model, ids[:200], tmp_path / "short", sequences=3, sequence_length=LENGTH)
    with pytest.raises(FileNotFoundError, match="holds no trajectories"):
        load_trajectories(tmp_path)
    (tmp_path / "broken").mkdir()
    for file in directory.iterdir():
        (tmp_path / "broken" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "broken" / shards[0].name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is corrupt"):
        load_trajectories(tmp_path / "broken")


def test_trajectories_of_one_model_or_text_are_never_trained_on_for_another(tiny, tmp_path, capsys, monkeypatch):
    """The default folder (under $KVCOMPRESS_CACHE) differs for other weights, another text or other sampling, and is the same for
    a copy of the same weights under another name (which resumes it, saying so); a folder named by hand that holds another
    model's is refused."""
    model, ids, directory, _ = tiny
    retrained, renamed = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        retrained.model.layers[1].self_attn.k_proj.weight.mul_(1.5)
    renamed.config._name_or_path = "/elsewhere/copy-of-tiny"

    def folder(model, token_ids=ids, **sampling):
        return default_directory(trajectory_settings(model, token_ids, sequence_length=LENGTH, **sampling), tmp_path / "trajectories")

    assert folder(model) == folder(renamed) and folder(model).name.startswith("llama-")
    assert len({folder(model), folder(retrained), folder(model, ids.flip(0)), folder(model, query_positions=16), folder(model, source="recall")}) == 5
    assert folder(model, ids[: 2 * LENGTH]) == folder(model)  # more text beyond the first sequence: the same collection, resumed
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    sampling = {"sequences": 3, "sequence_length": LENGTH, "query_positions": 32, "first_query": 16}
    default = folder(model, query_positions=32, first_query=16)
    capsys.readouterr()
    collect_trajectories(model, ids, **sampling)
    assert f"trajectories go to {default}/" in capsys.readouterr().err and len(list(default.glob("sequence-*"))) == 3
    assert collect_trajectories(renamed, ids, **sampling).sequences == 3
    assert f"3 of the 3 sequences' trajectories are in {default} from an earlier run: kept" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds trajectories of another model .*weights differ"):
        collect_trajectories(retrained, ids, directory, sequences=3, sequence_length=LENGTH, query_positions=32, first_query=16)
    with pytest.raises(ValueError, match="other settings \\(text differ\\)"):
        collect_trajectories(model, ids.flip(0), directory, sequences=3, sequence_length=LENGTH, query_positions=32, first_query=16)



def test_an_untrained_sidecar_is_attention_matching(tiny):
    model, _, _, data = tiny
    network = _network()
    keys, values, queries = torch.randn(5, 8, 16), torch.randn(5, 8, 16), torch.randn(1, 12, 16)
    start = attention_matching_merge(keys, values, queries, 2)
    merged_keys, merged_values, bias = network(keys, values, torch.arange(5) % 4, start)
    assert torch.equal(merged_keys, start.keys) and torch.equal(merged_values, start.values) and torch.equal(bias, start.bias)
    compressor, ids = _compressor(model, data), prompt_ids(60)
    assert torch.equal(greedy(model, SidecarCache(compressor), ids), greedy(model, SidecarCache(compressor, merge="attention_matching"), ids))
    assert sum(p.numel() for p in SidecarNetwork(30, 3, 64, 32, 1).parameters()) in range(1_000_000, 5_000_000)
    with pytest.raises(ValueError, match="slots must be between 1 and the window \\(8 tokens\\), got 9"):
        SidecarNetwork(2, 2, 16, window=8, slots=9)
    with pytest.raises(ValueError, match="merges windows of 8 tokens, got 6"):
        network(keys[:, :6], values[:, :6], torch.arange(5) % 4, start)


def test_the_window_frame_makes_merging_independent_of_position():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    keys = torch.randn(1, 2, 8, 16)
    at = lambda start: rotate(keys, torch.arange(start, start + 8)[None], inv_freq)  # noqa: E731
    framed = [to_window_frame(at(start), torch.tensor([start]), inv_freq) for start in (0, 37, 500)]
    assert torch.allclose(framed[0], framed[1], atol=1e-4) and torch.allclose(framed[0], framed[2], atol=1e-4)
    back = to_window_frame(framed[1], torch.tensor([37]), inv_freq, inverse=False)
    assert torch.allclose(back, at(37), atol=1e-4)


@pytest.mark.parametrize("merge", ["sidecar", "attention_matching"])
def test_with_one_slot_per_token_the_cache_equals_dense(tiny, merge):
    model, _, _, data = tiny
    compressor = _compressor(model, data, window=8, slots=8)
    ids = prompt_ids(40)
    cache = SidecarCache(compressor, merge=merge)
    assert torch.equal(greedy(model, cache, ids, new_tokens=24), greedy(model, DynamicCache(), ids, new_tokens=24))
    assert int((cache.layers[0].store["token_ids"] == SYNTHESIZED).sum()) > 0


@pytest.mark.parametrize("merge", ["sidecar", "attention_matching"])
def test_windows_leaving_the_recent_window_become_k_super_tokens(tiny, merge):
    model, _, _, data = tiny
    cache = SidecarCache(_compressor(model, data, window=8, slots=2), merge=merge)
    greedy(model, cache, prompt_ids(100), new_tokens=20)
    layer = cache.layers[1]
    handed = int(layer.handed[0])
    assert handed % 8 == 0 and handed >= 100 + 20 - 1 - 4 - 8 - 8
    assert layer.store["token_ids"].shape[-1] == handed // 4 and bool((layer.store["token_ids"] == SYNTHESIZED).all())
    assert torch.isfinite(layer.store["bias"]).all()
    assert cache.get_seq_length() == 100 + 20 - 1
    assert cache.nbytes() < 0.45 * cache.dense_nbytes()


def test_a_left_padded_batch_matches_each_row_alone(tiny):
    model, _, _, data = tiny
    compressor = _compressor(model, data)
    assert_left_padded_batch_matches_rows(model, lambda: SidecarCache(compressor), length=50, padding=6, new_tokens=12)


def test_losses_and_diagnostics_of_a_step(tiny):
    model, _, _, data = tiny
    network, inv_freq = _network(), rope_inv_freq(model)
    for parameter in network.out.parameters():  # a trained-looking network: nonzero corrections
        torch.nn.init.normal_(parameter, std=0.01)
    references = _references(model, data)
    framed = window_frame_references(references.queries, references.offsets, 8, inv_freq)
    generator = torch.Generator().manual_seed(0)
    batch = sample_stretches(data, 0, 1, regions=3, span=16, sink=4, augment=0.5, noise=0.1, generator=generator)
    assert batch.queries.shape[2] == 32 + 16 and batch.real == 32
    merged = merge_stretches(network, batch, 2, inv_freq, framed[1][None])
    assert merged.keys.shape == (3, 2, 4, 16) and merged.dense_keys.shape == (3, 2, 16, 16)
    with torch.enable_grad():
        loss, metrics = step_losses(network, batch, 2, inv_freq, framed, LossWeights(), generator, diagnose=True)
        loss.backward()
    assert all(p.grad is not None for p in network.out.parameters()) and float(network.out.weight.grad.abs().sum()) > 0
    for name in ("consistency", "force", "jacobian", "norm", "jacobian_ratio", "diversity", "output_cosine", "entropy_ratio"):
        assert torch.isfinite(torch.tensor(metrics[name])), name
    assert 0 < metrics["consistency"] < 1 and 0 < metrics["output_cosine"] <= 1
    assert unhealthy({"key_norm_ratio": 0.3, "value_norm_ratio": 1.0, "jacobian_norm_ratio": 2.5}) == [
        "key_norm_ratio 0.30 (collapse)", "jacobian_norm_ratio 2.50 (explosion)"]
    assert unhealthy({"key_norm_ratio": 0.6, "value_norm_ratio": 1.9, "jacobian_norm_ratio": 1.0}) == []


def test_a_network_that_never_beats_attention_matching_is_reported(tiny):
    model, _, _, data = tiny
    train, heldout = data.split(1)
    settings = TrainingSettings(steps=10, windows=2, regions=3, eval_every=5, eval_pairs=4, learning_rate=1e-12)  # no step can help
    with torch.enable_grad():
        history = train_sidecar(_network(), train, heldout, rope_inv_freq(model), _references(model, train), LossWeights(), settings)
    assert history["best_step"] == 0
    assert any("never beat its starting point" in line and "plain attention matching" in line for line in training_warnings(history))


def test_training_lowers_the_held_out_objective_and_the_artifact_round_trips(tiny, tmp_path):
    model, _, _, data = tiny
    train, heldout = data.split(1)
    network = _network()
    settings = TrainingSettings(steps=30, windows=2, regions=3, eval_every=10, eval_pairs=4, learning_rate=1e-3)
    with torch.enable_grad():
        history = train_sidecar(network, train, heldout, rope_inv_freq(model), _references(model, train), LossWeights(), settings)
    assert history["best"]["objective"] < history["initial"]["objective"]  # better than attention matching alone, on held-out data
    assert not any("never beat" in line for line in training_warnings(history))
    compressor = _compressor(model, train, network=network)
    compressor.save_pretrained(tmp_path)
    loaded = SidecarCache.from_pretrained(tmp_path)
    assert loaded.compressor is SidecarCache.from_pretrained(tmp_path).compressor  # shared weights
    ids = prompt_ids(60)
    assert torch.equal(greedy(model, loaded, ids), greedy(model, SidecarCache(compressor), ids))
    with pytest.raises(ValueError, match="Unknown merge 'average'"):
        SidecarCache(compressor, merge="average")
    from kvcompress.lowrank import PCACache

    with pytest.raises(Exception, match="load it with SidecarCache"):
        PCACache.from_pretrained(tmp_path)
    broken = dict(compressor.tensors)
    broken["network.out.weight"] = broken["network.out.weight"][:3]
    with pytest.raises(ConfigError, match=r"network.out.weight is \(3, 32\), its config says \(33, 32\)"):
        SidecarCompressor(compressor.config, broken)
    with pytest.raises(ConfigError, match="reference_offsets holds 16 references but its reference_queries holds 15"):
        SidecarCompressor(compressor.config, compressor.tensors | {"reference_queries": compressor.tensors["reference_queries"][:, :, :15]})
    with pytest.raises(ConfigError, match="'sidecar' section is invalid: slots must be between 1 and the window"):
        SidecarCompressor(compressor.config | {"sidecar": compressor.config["sidecar"] | {"slots": 99}}, compressor.tensors)
    with pytest.raises(ConfigError, match="lacks tensor reference_queries"):
        SidecarCompressor(compressor.config, {k: v for k, v in compressor.tensors.items() if k != "reference_queries"})
    with pytest.raises(ValueError, match="fitted for tiny"):
        greedy(tiny_model("llama", num_key_value_heads=4), SidecarCache(compressor), prompt_ids(30), new_tokens=2)


# ------------------------------------------------------------------------------------------------ keep-and-merge
def _bundled(model, data, window=8, slots=2):
    return _compressor(model, data, window, slots).with_gates(tiny_gates(model))


def test_attention_matching_merges_only_the_tokens_not_excluded():
    keys, values, queries = torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16), torch.randn(1, 2, 12, 16)
    excluded = torch.ones(3, 2, 8, dtype=torch.bool)
    excluded[..., [1, 6]] = False  # two tokens left for two slots: the merge is those two tokens, exactly
    merged = attention_matching_merge(keys, values, queries, 2, excluded=excluded)
    assert torch.equal(merged.selected, torch.tensor([1, 6]).expand(3, 2, 2))
    assert torch.equal(merged.keys, keys[..., [1, 6], :])
    assert torch.allclose(merged.bias, torch.zeros(3, 2, 2), atol=1e-4) and torch.allclose(merged.values, values[..., [1, 6], :], atol=1e-3)
    excluded[..., :4] = True  # more tokens than slots: the tokens excluded do not change the merge
    changed = keys.clone()
    changed[..., :4, :] = torch.randn(3, 2, 4, 16) * 5
    one, two = attention_matching_merge(keys, values, queries, 2, excluded=excluded), attention_matching_merge(changed, values, queries, 2, excluded=excluded)
    assert all(torch.allclose(a, b) for a, b in zip((one.keys, one.values, one.bias), (two.keys, two.values, two.bias)))


def test_the_network_does_not_see_excluded_tokens():
    network = _network()
    torch.nn.init.normal_(network.out.weight, std=0.1)
    keys, values, queries = torch.randn(5, 8, 16), torch.randn(5, 8, 16), torch.randn(1, 12, 16)
    excluded = torch.rand(5, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    excluded[:, 0] = False
    start = attention_matching_merge(keys, values, queries, 2, excluded=excluded)
    changed = torch.where(excluded[..., None], torch.randn(5, 8, 16) * 3, keys)
    first, second = network(keys, values, torch.arange(5) % 4, start, excluded), network(changed, values, torch.arange(5) % 4, start, excluded)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, second))
    assert not torch.allclose(first[0], network(keys, values, torch.arange(5) % 4, start)[0])  # without the mask it sees them


def test_keep_and_merge_keeps_gated_tokens_exact_and_merges_the_rest(tiny):
    model, _, _, data = tiny
    compressor = _bundled(model, data)
    ids = prompt_ids(120)
    everything = SidecarCache(compressor, keep_ratio=1.0)
    assert everything.mode == "keep_and_merge"
    assert torch.equal(greedy(model, everything, ids, new_tokens=16), greedy(model, DynamicCache(), ids, new_tokens=16))
    cache = SidecarCache(compressor, keep_ratio=0.3)
    greedy(model, cache, ids, new_tokens=16)
    for layer in cache.layers:
        token_ids, bias = layer.store["token_ids"], layer.store["bias"]
        exact, merged = token_ids >= 0, token_ids == SYNTHESIZED
        assert bool(exact.any()) and bool(merged.any())
        assert bool((bias[exact] == 0).all()) and bool(torch.isfinite(bias[merged]).all())
        handed = int(layer.handed[0])
        assert bool((token_ids[exact] < 4 + handed).all())  # only handed tokens are kept
        # per head, every window of 8 is its kept tokens plus at most 2 super-tokens: never more slots than tokens
        assert bool((exact.sum(-1) + merged.sum(-1) <= handed).all()) and bool((merged.sum(-1) <= handed // 8 * 2).all())
        assert not torch.equal(exact[:, 0], exact[:, 1])  # heads keep their own tokens
    merging = SidecarCache(compressor, mode="merge")
    greedy(model, merging, ids, new_tokens=16)
    assert merging.nbytes() < cache.nbytes() < everything.nbytes()


def test_training_with_gates_keeps_the_tokens_the_cache_keeps_and_merges_only_the_rest(tiny):
    """Keep-and-merge training (calibrate --gates): the gates keep in a step the tokens a keep-and-merge cache keeps over the
    same sequence; they stay exact beside the super-tokens and the merge never sees them."""
    model, ids, _, data = tiny
    gates = tiny_gates(model)
    kept = KeptByGates(gates, 0.3).kept(data.layer(0, 1)["keys"].float(), 1)  # [H, T] of sequence 0 (its first 128 tokens), layer 1
    cache = SidecarCache(_compressor(model, data).with_gates(gates), keep_ratio=0.3)
    with torch.no_grad():
        model(input_ids=ids[None, :LENGTH], **cache_kwargs(cache))
    layer = cache.layers[1]
    handed = int(layer.handed[0])
    held = torch.zeros(2, LENGTH, dtype=torch.bool)
    for head in range(2):
        held[head, [int(t) for t in layer.store["token_ids"][0, head] if 4 <= t < 4 + handed]] = True
    chosen, agree = kept[:, 4 : 4 + handed], (held[:, 4 : 4 + handed] == kept[:, 4 : 4 + handed]).float().mean()
    assert 0.2 < chosen.float().mean() < 0.8 and agree > 0.97  # trajectories hold keys in float16: a token at the threshold may differ

    network, inv_freq = _network(), rope_inv_freq(model)
    for parameter in network.out.parameters():  # a trained-looking network: nonzero corrections
        torch.nn.init.normal_(parameter, std=0.01)
    references = _references(model, data)
    framed = window_frame_references(references.queries, references.offsets, 8, inv_freq)
    batch = sample_stretches(data, 0, 1, regions=3, span=16, sink=4, augment=0.0, noise=0.0, generator=torch.Generator().manual_seed(0), gates=KeptByGates(gates, 0.3))
    assert torch.equal(batch.kept, kept)
    merged = merge_stretches(network, batch, 2, inv_freq, framed[1][None])
    inside = batch.starts[:, None] + torch.arange(16)  # [R, span]
    assert torch.equal(merged.kept, kept[:, inside].transpose(0, 1))
    changed = batch.keys.clone(), batch.values.clone()
    for tensor in changed:  # the kept tokens of the stretches, changed: the super-tokens do not move
        tensor[:, inside.flatten()] += 3 * torch.randn(2, inside.numel(), 16) * kept[:, inside.flatten(), None]
    again = merge_stretches(network, dataclasses.replace(batch, keys=changed[0], values=changed[1]), 2, inv_freq, framed[1][None])
    assert torch.allclose(again.keys, merged.keys, atol=1e-5) and torch.allclose(again.values, merged.values, atol=1e-5)
    windows = kept.clone()  # one slot a window: a slot is dropped exactly where its window is wholly kept, per head
    windows[0, inside[0, :8]] = True
    wholly = windows[:, inside].transpose(0, 1).reshape(3, 2, 2, 8).all(-1)  # [R, H, windows]
    dropped = merge_stretches(_network(8, 1), dataclasses.replace(batch, kept=windows), 2, inv_freq, framed[1][None]).bias == DROPPED
    assert bool(wholly[0, 0, 0]) and torch.equal(dropped, wholly)
    split = dataclasses.replace(batch, kept=torch.stack([torch.ones_like(kept[0]), torch.zeros_like(kept[1])]))  # head 0 keeps all, head 1 none
    attention = StretchAttention(split, merge_stretches(network, split, 2, inv_freq, framed[1][None]))
    error = (attention.merged(batch.queries.expand(3, *batch.queries.shape)) - attention.dense(batch.queries)).norm(dim=-1)  # [R, H, G, Q]
    valid = attention.valid.expand(error.shape)
    assert float(error[:, 0][valid[:, 0]].max()) < 1e-4 and float(error[:, 1][valid[:, 1]].max()) > 1e-3
    every = dataclasses.replace(batch, kept=torch.ones_like(kept))  # every token kept: no slot stands for one, the step's context is dense
    with torch.enable_grad():
        _, metrics = step_losses(network, every, 2, inv_freq, framed, LossWeights(), torch.Generator().manual_seed(0), diagnose=True)
        _, partly = step_losses(network, batch, 2, inv_freq, framed, LossWeights(), torch.Generator().manual_seed(0), diagnose=True)
    assert metrics["consistency"] < 1e-10 and metrics["output_cosine"] > 0.99999 and metrics["diversity"] == 0  # no slot held, none to diversify
    assert 0 < partly["consistency"] and all(torch.isfinite(torch.tensor(value)) for value in partly.values())


def test_keep_and_merge_matches_each_row_alone_and_its_artifact_round_trips(tiny, tmp_path):
    model, _, _, data = tiny
    compressor = _bundled(model, data)
    assert_left_padded_batch_matches_rows(model, lambda: SidecarCache(compressor, keep_ratio=0.3), length=70, padding=9, new_tokens=12)
    compressor.save_pretrained(tmp_path)
    loaded = SidecarCache.from_pretrained(tmp_path, keep_ratio=0.3)
    assert loaded.compressor.gate is not None and loaded.mode == "keep_and_merge"
    ids = prompt_ids(90)
    assert torch.equal(greedy(model, loaded, ids), greedy(model, SidecarCache(compressor, keep_ratio=0.3), ids))
    with pytest.raises(ConfigError, match="lacks tensor gates.w2"):
        SidecarCompressor(compressor.config, {k: v for k, v in compressor.tensors.items() if k != "gates.w2"})
    with pytest.raises(ConfigError, match="holds tensor\\(s\\) its config does not declare \\(gates"):
        SidecarCompressor({k: v for k, v in compressor.config.items() if k != "gates"}, compressor.tensors)


def test_keep_and_merge_ratio_is_one_budget_the_merged_slots_take_first(tiny):
    """Under ratio= every head holds at most the budget's slots: every merged slot, then its most probable marked tokens;
    the held memory follows the ratio, and a lower ratio holds more exact tokens."""
    model, _, _, data = tiny
    compressor = _bundled(model, data, window=8, slots=1)
    ids, exact = prompt_ids(300), {}
    for ratio in (2.5, 3.5):
        cache = SidecarCache(compressor, ratio=ratio, context=300)
        greedy(model, cache, ids, new_tokens=4)
        target = cache.keep.target
        assert target.merged == 1 / 8 and 0 < target.kept < 1 - 1 / 8
        assert 0.8 * ratio < cache.dense_nbytes() / cache.nbytes() < 1.25 * ratio, cache.dense_nbytes() / cache.nbytes()
        exact[ratio] = 0
        for layer in cache.layers:
            token_ids = layer.store["token_ids"]
            allowed = target.tokens(layer.layer_idx, layer.seen, layer.settings)[:, None]
            assert bool(((token_ids != FILLER).sum(-1) <= allowed).all())
            merged = (token_ids == SYNTHESIZED).sum(-1)
            assert bool((merged >= (int(layer.handed[0]) // 8) // 2).all())  # the merged slots stay (a slot on a kept token is dropped)
            exact[ratio] += int((token_ids >= 0).sum())
    assert exact[2.5] > exact[3.5] > 0


def test_keep_and_merge_budget_holds_every_merged_slot_and_loses_no_token_to_ties(tiny):
    """Whatever the length, each window handed either keeps all its tokens or holds its merged slot (a short prompt's
    budget is its merged slots); and tied probabilities never keep more tokens out of the merge than the budget holds."""
    model, _, _, data = tiny
    compressor = _bundled(model, data, window=8, slots=1)
    for length in (13, 16, 21, 24, 30, 41, 64, 100):
        cache = SidecarCache(compressor, ratio=2.5, context=300)
        greedy(model, cache, prompt_ids(length), new_tokens=3)
        for layer in cache.layers:
            token_ids, windows = layer.store["token_ids"], int(layer.handed[0]) // 8
            merged, exact = (token_ids == SYNTHESIZED).sum(-1), (token_ids >= 0).sum(-1)
            assert bool((merged >= windows - exact // 8).all()), (length, merged, exact, windows)
    gates = compressor.gate.tensors["gates.b3"]  # every gate says the same: all probabilities tie
    tied = SidecarCompressor(compressor.config, compressor.tensors | {name: torch.zeros_like(t) for name, t in compressor.tensors.items() if name.startswith("gates.w")}
                             | {"gates.b3": torch.full_like(gates, 3.0)})
    cache = SidecarCache(tied, ratio=2.5, context=300)
    greedy(model, cache, prompt_ids(200), new_tokens=3)
    for layer in cache.layers:
        token_ids, windows = layer.store["token_ids"], int(layer.handed[0]) // 8
        assert bool(((token_ids == SYNTHESIZED).sum(-1) >= windows - (token_ids >= 0).sum(-1) // 8).all())
        assert bool(((token_ids != FILLER).sum(-1) <= cache.keep.target.tokens(layer.layer_idx, layer.seen, layer.settings)[:, None]).all())


def test_keep_and_merge_refuses_what_it_cannot_do(tiny):
    model, _, _, data = tiny
    plain, bundled = _compressor(model, data), _bundled(model, data)
    assert SidecarCache(plain).mode == "merge" and "with gates" in repr(bundled) and "with gates" not in repr(plain)
    assert "metrics" not in bundled.config and bundled.config["calibration"]["bundled_gates"] == bundled.gate.config.get("calibration", {})
    for mode in ("keep_and_merge", None):  # keep_ratio= alone asks for keep-and-merge too
        with pytest.raises(ValueError, match="carries no gates, so it can only merge: use mode='merge', or bundle gates"):
            SidecarCache(plain, mode=mode, keep_ratio=0.2 if mode is None else None)
    with pytest.raises(ValueError, match="mode='merge' keeps none"):
        SidecarCache(bundled, mode="merge", keep_ratio=0.2)
    for mode in ("keep", ""):
        with pytest.raises(ValueError, match=f"Unknown mode '{mode}'"):
            SidecarCache(bundled, mode=mode)
    with pytest.raises(ValueError, match="Give either ratio= .* or keep_ratio="):
        SidecarCache(bundled, ratio=4, keep_ratio=0.2)
    with pytest.raises(ValueError, match="The merged slots alone hold more than 1/6 of the dense cache at 4096 tokens \\(at most 3.97:1 with no token kept\\)"):
        SidecarCache(bundled, ratio=6)
    assert SidecarCache(bundled, ratio=3).keep_ratio < 1
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="bundle gates fitted for the sidecar's model"):
        plain.with_gates(tiny_gates(other))
    with pytest.raises(TypeError, match="with_gates needs a GateCompressor"):
        plain.with_gates(plain)


"""Under transformers' tensor parallelism (torchrun, tp_plan="auto"; on the CPU with the gloo backend) each rank's cache holds
its own KV heads and serves them from per-rank slices of its artifacts: at settings that lose nothing every cache equals dense
token for token, and compressing, every cache generates what it generates in one process (a wrong slice, another rank's
gates or ranks, would not). The artifacts are fitted on the whole model, with other ranks for every head of the low-rank ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensor_parallel_worker import caches, generate, prompt, shipped
from test_differential import Model, artifact, load
from test_lowrank import SETTINGS, calibrate

from kvcompress import GatedCache
from kvcompress.config import HeadRanks, RankConfig
from kvcompress.gate import GateCompressor, GateKeep
from kvcompress.parallel import rank_heads
from kvcompress.policies import KeepPolicy

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
SPEC = Model("llama", layers=2, kv_heads=4, groups=2, head_dim=16, hidden=64)  # 2 ranks of 2 KV heads (4 query heads) each
LENGTH = 72


def save_artifacts(directory: Path) -> None:
    model = load(SPEC)
    ranks = {(layer, head): HeadRanks(4 + 3 * head, 2 + head + layer) for layer in range(SPEC.layers) for head in range(SPEC.kv_heads)}
    uneven = RankConfig(SPEC.layers, SPEC.kv_heads, SPEC.head_dim, SPEC.head_dim, ranks)
    fits = calibrate(model)
    fits.fit("pca", uneven, SETTINGS)[0].save_pretrained(directory / "pca")
    fits.fit("kvsplice", uneven, SETTINGS, kvsplice_steps=10)[0].save_pretrained(directory / "kvsplice")
    artifact(SPEC, "gate").save_pretrained(directory / "gate")
    artifact(SPEC, "sidecar", 4, 2, False).save_pretrained(directory / "sidecar")
    artifact(SPEC, "sidecar", 4, 2, True).save_pretrained(directory / "sidecar-gated")


def test_every_cache_serves_its_ranks_heads_under_tensor_parallelism(tmp_path):
    model = load(SPEC)
    model.save_pretrained(tmp_path / "model")
    save_artifacts(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "model"), str(LENGTH), str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[0].removeprefix("RESULTS "))
    factories = caches(tmp_path)
    assert results["kv heads held"] == [dict.fromkeys(factories, SPEC.kv_heads // 2)] * 2
    assert results["equal dense"] == dict.fromkeys(factories, True)
    ids, mask = prompt(model, LENGTH)
    alone = {name: generate(model, compressing(), ids, mask) for name, (_, compressing) in factories.items()}
    assert results["tokens"] == alone


def test_the_shipped_compressors_serve_three_ranks_of_the_default_model(default_model):
    """SmolLM2-135M-Instruct's 3 KV heads over 3 ranks, each serving one head of the shipped gates, sidecar and projections."""
    model, _ = default_model
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(WORKER), model.name_or_path, "400", "shipped"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[0].removeprefix("RESULTS "))
    factories = shipped()
    assert results["kv heads held"] == [dict.fromkeys(factories, 1)] * 3
    assert results["equal dense"] == dict.fromkeys(factories, True)
    ids, mask = prompt(model, 400)
    assert results["tokens"] == {name: generate(model, compressing(), ids, mask) for name, (_, compressing) in factories.items()}


def test_an_artifact_serving_other_heads_than_the_layer_computes_is_refused():
    """The first attention call of a layer checks the heads an artifact serves against the layer's own (here: all four)."""
    attention = load(SPEC).model.layers[0].self_attn
    with pytest.raises(ValueError, match="Layer 0 computes KV heads 0-3 but this cache serves heads 2-3: under tensor parallelism"):
        artifact(SPEC, "gate").for_heads(range(2, 4)).check_module(attention)
    artifact(SPEC, "gate").for_heads(range(4)).check_module(attention)  # all of them: the layer's


@pytest.mark.parametrize("heads", [range(3, 5), range(0, 4, 2), range(2, 2), [0, 1]])
def test_heads_outside_the_model_are_refused(heads):
    with pytest.raises(ValueError, match="heads must be a range of consecutive KV heads within the model's 4"):
        artifact(SPEC, "gate").for_heads(heads)


def test_a_served_slice_holds_the_served_heads_of_the_whole():
    """A slice's gate bank, projections and sidecar network answer for heads 2-3 what the whole artifact's answer for them."""
    keys = torch.randn(1, 2, 5, SPEC.head_dim, generator=torch.Generator().manual_seed(0))
    whole, served = artifact(SPEC, "gate"), artifact(SPEC, "gate").for_heads(range(2, 4))
    assert served.bank("cpu").w1.shape[0] == SPEC.layers * 2
    padded = torch.cat([torch.zeros_like(keys), keys], dim=1)
    assert torch.allclose(served.bank("cpu").layer_logits(1, keys), whole.bank("cpu").layer_logits(1, padded)[:, 2:])
    assert torch.equal(served.thresholds(0.3), whole.thresholds(0.3)[:, 2:])
    sidecar = artifact(SPEC, "sidecar", 4, 2, False)
    assert torch.equal(sidecar.for_heads(range(2, 4)).window_frame_queries(1, "cpu"), sidecar.window_frame_queries(1, "cpu")[:, 2:])
    network = sidecar.for_heads(range(2, 4)).device_network("cpu")
    assert torch.equal(network.identity.weight, sidecar.network.identity.weight.view(SPEC.layers, SPEC.kv_heads, -1)[:, 2:].flatten(0, 1))


def test_a_union_over_a_layers_heads_is_refused_under_tensor_parallelism():
    cache = GatedCache(artifact(SPEC, "gate"), keep_ratio=0.3, policy="layer")
    with pytest.raises(ValueError, match="policy='layer' keeps a token in every head of a layer .* use policy='head'"):
        cache.keep.for_heads(range(2))


def test_a_policy_with_artifacts_must_say_how_it_serves_some_heads():
    class Custom(KeepPolicy):
        artifacts = (artifact(SPEC, "gate"),)

    policy = KeepPolicy()
    assert policy.for_heads(range(2)) is policy  # nothing per head: it serves any heads as it is
    with pytest.raises(NotImplementedError, match="Custom holds per-head artifacts but does not say how to serve some of the heads"):
        Custom().for_heads(range(2))


def test_a_split_over_some_of_the_processes_is_refused_with_what_to_run(tmp_path):
    """Tensor parallelism combined with other parallelism (here: one process showing half of the heads) is not served."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="holds 2 of the model's 4 KV heads, a tensor-parallel split over 2 processes, but 1 processes run: .*--nproc_per_node 2"):
            rank_heads(2, 4)
        assert rank_heads(4, 4) is None  # every head: not split
    finally:
        dist.destroy_process_group()


def test_serving_some_heads_keeps_the_policy_its_class_and_shares_what_it_builds():
    """A subclass of a shipped policy stays itself (its own choose runs on every rank); every cache of a rank shares one
    slice of an artifact, built once; and building it draws no random numbers (sampling stays as seeded)."""

    class MyGates(GateKeep):
        pass

    gate = artifact(SPEC, "gate")
    assert type(MyGates(gate, 0.3).for_heads(range(2))) is MyGates
    assert gate.for_heads(range(2, 4)) is gate.for_heads(range(2, 4))
    fresh = GateCompressor(dict(gate.config), dict(gate.tensors)).for_heads(range(2))
    state = torch.get_rng_state()
    fresh.bank("cpu")
    assert torch.equal(state, torch.get_rng_state())

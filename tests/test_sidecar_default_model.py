"""SidecarCache on the real default model: the calibrate command collects trajectories with forces, trains (merging
what the gates leave), saves and reports; both merges beat StreamingLLM at the same measured memory on held-out prose."""

import json

import pytest
import torch

from kvcompress import SidecarCache, StreamingLLMCache
from kvcompress.calibration.trajectories import load_trajectories
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import streaming_perplexity
from kvcompress.hub import PRETRAINED_DIR

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, default_model):
    from kvcompress.calibration import sidecar
    from kvcompress.calibration.cli import main

    directory = tmp_path_factory.mktemp("sidecar")
    output, trajectories = directory / "sidecar", directory / "trajectories"
    trained_with = []

    def train(*args, gates=None, **kwargs):
        trained_with.append(gates)
        return train_sidecar(*args, gates=gates, **kwargs)

    train_sidecar = sidecar.train_sidecar
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sidecar, "train_sidecar", train)
        main([
            "calibrate", "--method", "sidecar", "--slots", "4", "--trajectories", str(trajectories), "--trajectory-sequences", "2",
            "--heldout-sequences", "1", "--query-positions", "64", "--sidecar-steps", "20", "--eval-tokens", "256", "--output", str(output),
            "--plot", str(directory / "training.png"), "--gates", str(PRETRAINED_DIR / "smollm2-135m-instruct-gate"), "--recall-facts", "2",
            "--train-keep-ratio", "0.05",
        ])
    assert [type(gates).__name__ for gates in trained_with] == ["KeptByGates"] and trained_with[0].keep_ratio == 0.05  # it trained on what they leave
    return output, trajectories, directory / "training.png"


def test_calibrate_command_collects_forces_trains_and_saves(calibrated, capsys):
    output, trajectories, plot = calibrated
    data = load_trajectories(trajectories)
    part = data.layer(2, 29)
    assert (data.sequences, data.num_layers) == (3, 30) and part["keys"].shape == (3, 1024, 64) and part["forces"].shape == (9, 64, 64)
    assert float(part["forces"].norm(dim=-1).mean()) > 0 and float(part["output_grads"].norm(dim=-1).mean()) > 0
    history = json.loads((output / "training_history.json").read_text())
    assert [entry["step"] for entry in history] == [0, 20]
    for entry in history:  # the seed-001 diagnostics, logged at every evaluation, inside [0.5, 2]
        for name in ("key_norm_ratio", "value_norm_ratio", "jacobian_norm_ratio"):
            assert 0.5 <= entry[name] <= 2, (name, entry[name])
        assert 0.9 < entry["output_cosine"] <= 1
    assert data.settings["source"] == "recall sequences, 2 facts each"  # queries and forces of recall questions (resumed only as such)
    results = json.loads((output / "calibration_results.json").read_text())
    assert results["measured_memory_savings"] > 0.2 and "heldout_output_error_attention_matching" in results  # keep-and-merge at 256 tokens
    assert plot.stat().st_size > 10_000
    cache = SidecarCache.from_pretrained(output)
    assert cache.compressor.config["training"]["loss"] == "force" and cache.compressor.slots == 4 and cache.compressor.window == 32
    assert cache.compressor.config["training"]["train_keep_ratio"] == 0.05  # it trained merging what the gates leave
    assert cache.mode == "keep_and_merge" and cache.compressor.gate.config["label"]["threshold"] > 0  # the gates travel with it


@pytest.mark.parametrize("merge", ["sidecar", "attention_matching"])
def test_sidecar_cache_beats_streamingllm_at_the_same_memory(calibrated, default_model, merge):
    model, tokenizer = default_model
    ids = torch.tensor([tokenizer(heldout_text()).input_ids[:768]])
    merged = streaming_perplexity(model, ids, SidecarCache.from_pretrained(calibrated[0], mode="merge", merge=merge))
    ratio = merged.dense_nbytes / merged.nbytes
    assert ratio > 3.5  # memory really saved, biases and the exact sink and window included
    streaming = streaming_perplexity(model, ids, StreamingLLMCache(ratio=ratio))
    assert streaming.nbytes >= 0.95 * merged.nbytes
    assert merged.perplexity < streaming.perplexity


def test_keep_and_merge_keeps_the_pass_key_that_merging_alone_loses(default_model):
    """The shipped sidecar carrying the shipped gates: at 1,536 tokens, pass keys that pure merging loses at every depth are
    found once the gates' tokens stay exact, by keep ratio or in a budget the merged slots share (ratio=4), and the memory
    stays well below dense (the budget at its ratio)."""
    from kvcompress import SidecarCompressor
    from kvcompress.evaluation.harness import passkey_context, passkey_trial
    from kvcompress.gate import GateCompressor

    model, tokenizer = default_model
    bundled = SidecarCompressor.from_pretrained(PRETRAINED_DIR / "smollm2-135m-instruct-sidecar-8x").with_gates(GateCompressor.from_pretrained(PRETRAINED_DIR / "smollm2-135m-instruct-gate"))
    hay = tokenizer(heldout_text()).input_ids
    caches = {
        "keep_and_merge": lambda: SidecarCache(bundled, keep_ratio=0.05), "merge": lambda: SidecarCache(bundled, mode="merge"),
        "budget": lambda: SidecarCache(bundled, ratio=4, context=1536),
    }
    found = dict.fromkeys(caches, 0)
    for index, depth in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        key = 31415 + 7919 * index
        context, question = passkey_context(tokenizer, hay, 1536, depth, key, offset=index * 1536)
        for name, make in caches.items():
            cache = make()
            found[name] += passkey_trial(model, tokenizer, cache, context, question, key)
            assert cache.compression_ratio > 3.5  # keep-and-merge at this keep ratio holds about 1/4 of dense, merging about 1/5
            if name == "budget":
                assert cache.compression_ratio < 4.4, cache.compression_ratio
    assert found["merge"] == 0 and found["keep_and_merge"] >= 2 and found["budget"] >= 2, found

"""SidecarCache on the real default model: the calibrate command collects trajectories with forces, trains,
saves and reports; both merges beat StreamingLLM at the same measured memory on held-out prose."""

import json

import pytest
import torch

from kvcompress import SidecarCache, StreamingLLMCache
from kvcompress.calibration.trajectories import load_trajectories
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import streaming_perplexity

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, default_model):
    from kvcompress.calibration.cli import main

    directory = tmp_path_factory.mktemp("sidecar")
    output, trajectories = directory / "sidecar", directory / "trajectories"
    main([
        "calibrate", "--method", "sidecar", "--slots", "4", "--trajectories", str(trajectories), "--trajectory-sequences", "2",
        "--heldout-sequences", "1", "--query-positions", "64", "--sidecar-steps", "20", "--eval-tokens", "256", "--output", str(output),
        "--plot", str(directory / "training.png"),
    ])
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
    results = json.loads((output / "calibration_results.json").read_text())
    assert results["measured_memory_savings"] > 0.3 and "heldout_output_error_attention_matching" in results
    assert plot.stat().st_size > 10_000
    cache = SidecarCache.from_pretrained(output)
    assert cache.compressor.config["training"]["loss"] == "force" and cache.compressor.slots == 4 and cache.compressor.window == 32


@pytest.mark.parametrize("merge", ["sidecar", "attention_matching"])
def test_sidecar_cache_beats_streamingllm_at_the_same_memory(calibrated, default_model, merge):
    model, tokenizer = default_model
    ids = torch.tensor([tokenizer(heldout_text()).input_ids[:768]])
    merged = streaming_perplexity(model, ids, SidecarCache.from_pretrained(calibrated[0], merge=merge))
    ratio = merged.dense_nbytes / merged.nbytes
    assert ratio > 3.5  # memory really saved, biases and the exact sink and window included
    streaming = streaming_perplexity(model, ids, StreamingLLMCache(ratio=ratio))
    assert streaming.nbytes >= 0.95 * merged.nbytes
    assert merged.perplexity < streaming.perplexity

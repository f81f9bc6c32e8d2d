"""A model split by accelerate (`device_map`) over two GPUs, or with the second half's weights offloaded to the CPU (which
accelerate streams to the GPU for each forward, so that those layers run there): each layer's cache lives where its
layer runs, with the artifacts moved there, and every cache equals dense at settings that lose nothing and generates
what it generates on one GPU. Needs two CUDA GPUs (the device tool's nvidia-h200-x2) or one; skipped where there are fewer.
Offloading alone runs on the CPU too (to disk there)."""

import pytest
import torch
from tensor_parallel_worker import caches, generate, prompt
from test_differential import load
from test_tensor_parallel import LENGTH, SPEC, save_artifacts
from transformers import AutoModelForCausalLM, DynamicCache

import kvcompress

SPLITS = {  # the device_map of the second layer and what follows it, where that layer runs, and how many GPUs that takes
    "two GPUs": (1, torch.device("cuda", 1), 2),
    "weights offloaded to the CPU": ("cpu", torch.device("cuda", 0), 1),
}


@pytest.mark.parametrize("split", SPLITS)
def test_every_cache_runs_on_a_model_split_over_devices(tmp_path, split):
    second, runs_on, gpus = SPLITS[split]
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPU(s)")
    load(SPEC).save_pretrained(tmp_path / "model")
    save_artifacts(tmp_path)
    halves = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0} | dict.fromkeys(("model.layers.1", "model.norm", "lm_head"), second)
    models = {
        "split": AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=halves, attn_implementation="sdpa"),
        "one GPU": AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": 0}, attn_implementation="sdpa"),
    }
    model, whole = (kvcompress.enable(m.eval()) for m in models.values())
    assert {p.device.type for p in model.model.layers[1].parameters()} == ({"cuda"} if gpus == 2 else {"meta"})  # offloaded: held on the CPU
    ids, mask = prompt(whole, LENGTH)
    dense = generate(model, DynamicCache(), ids, mask)
    for name, (lossless, compressing) in caches(tmp_path).items():
        assert generate(model, lossless(), ids, mask) == dense, name
        cache = compressing()
        assert generate(model, cache, ids, mask) == generate(whole, compressing(), ids, mask), name
        assert [layer.tail["keys"].device for layer in cache.layers] == [torch.device("cuda", 0), runs_on], name


def test_every_cache_runs_on_a_model_with_weights_offloaded_to_disk(tmp_path):
    """accelerate's offloading ("disk" here, "cpu" next to a GPU) keeps a layer's weights on the meta device until the layer
    runs: the learned caches' model checks bring them in to measure them (they failed on meta tensors before), and every
    cache generates what it generates without offloading."""
    load(SPEC).save_pretrained(tmp_path / "model")
    save_artifacts(tmp_path)
    placement = dict.fromkeys(("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.norm", "lm_head"), "cpu") | {"model.layers.1": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=placement, offload_folder=tmp_path / "offload", attn_implementation="sdpa")
    assert {p.device.type for p in offloaded.model.layers[1].parameters()} == {"meta"}
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sdpa")
    model, whole = (kvcompress.enable(m.eval()) for m in (offloaded, whole))
    ids, mask = prompt(whole, LENGTH)
    for name, (_, compressing) in caches(tmp_path).items():
        assert generate(model, compressing(), ids, mask) == generate(whole, compressing(), ids, mask), name

"""A model split over two GPUs by accelerate (`device_map`): each layer's cache lives on its layer's GPU, with the artifacts
moved there, and every cache equals dense at settings that lose nothing and generates what it generates on one GPU.
Needs two CUDA GPUs (the device tool's nvidia-h200-x2); skipped elsewhere."""

import pytest
import torch
from tensor_parallel_worker import caches, generate, prompt
from test_differential import load
from test_tensor_parallel import LENGTH, SPEC, save_artifacts
from transformers import AutoModelForCausalLM, DynamicCache

import kvcompress

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_every_cache_runs_on_a_model_split_over_two_gpus(tmp_path):
    load(SPEC).save_pretrained(tmp_path / "model")
    save_artifacts(tmp_path)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    models = {
        "split": AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=split, attn_implementation="sdpa"),
        "one GPU": AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": 0}, attn_implementation="sdpa"),
    }
    model, whole = (kvcompress.enable(m.eval()) for m in models.values())
    ids, mask = prompt(whole, LENGTH)
    dense = generate(model, DynamicCache(), ids, mask)
    for name, (lossless, compressing) in caches(tmp_path).items():
        assert generate(model, lossless(), ids, mask) == dense, name
        cache = compressing()
        assert generate(model, cache, ids, mask) == generate(whole, compressing(), ids, mask), name
        assert [layer.tail["keys"].device.index for layer in cache.layers] == [0, 1], name

"""Run by `test_tensor_parallel.py` under torchrun: generate with a tensor-parallel model (tp_plan="auto") and print, per
cache, whether it generated dense's tokens at lossless settings, and the tokens it generates compressing (which the test
compares with one process's). Each rank's cache holds that rank's KV heads only, and learned caches serve them from the
artifacts in the directory given (fitted on the whole model by the test), or from the shipped compressors ("shipped")."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig, DynamicCache

import kvcompress
from kvcompress import ComposedCache, GatedCache, H2OCache, KVSpliceCache, PCACache, SidecarCache, StreamingLLMCache, cache_kwargs, load_cache
from kvcompress.hub import PRETRAINED_DIR

NEW_TOKENS = 12


def caches(artifacts: Path) -> dict:
    """Per cache: (a factory at settings that lose nothing on the prompt, a factory at settings that compress it)."""
    exact = {"sink": 4, "window": 10000}
    small = {"sink": 4, "window": 8}
    return {
        "streamingllm": (lambda: StreamingLLMCache(budget=10000), lambda: StreamingLLMCache(budget=24)),
        "h2o": (lambda: H2OCache(budget=10000), lambda: H2OCache(budget=24)),
        "h2o blocks of 8": (lambda: H2OCache(budget=10000, block_size=8), lambda: H2OCache(budget=32, block_size=8)),
        "gated": (lambda: GatedCache.from_pretrained(artifacts / "gate", keep_ratio=1.0), lambda: GatedCache.from_pretrained(artifacts / "gate", keep_ratio=0.3, **small)),
        "pca": (lambda: PCACache.from_pretrained(artifacts / "pca", **exact), lambda: PCACache.from_pretrained(artifacts / "pca", **small)),
        "kvsplice": (lambda: KVSpliceCache.from_pretrained(artifacts / "kvsplice", **exact), lambda: KVSpliceCache.from_pretrained(artifacts / "kvsplice", **small)),
        "sidecar": (lambda: SidecarCache.from_pretrained(artifacts / "sidecar", **exact), lambda: SidecarCache.from_pretrained(artifacts / "sidecar", **small)),
        "sidecar keep-and-merge": (
            lambda: SidecarCache.from_pretrained(artifacts / "sidecar-gated", keep_ratio=1.0, **small),
            lambda: SidecarCache.from_pretrained(artifacts / "sidecar-gated", keep_ratio=0.3, **small),
        ),
        "sidecar keep-and-merge, ratio=": (
            lambda: SidecarCache.from_pretrained(artifacts / "sidecar-gated", keep_ratio=1.0, **small),
            lambda: SidecarCache.from_pretrained(artifacts / "sidecar-gated", ratio=1.5, context=200, **small),
        ),
        "composed": (
            lambda: ComposedCache.from_pretrained(artifacts / "gate", artifacts / "pca", keep_ratio=1.0, bits=None, **exact),
            lambda: ComposedCache.from_pretrained(artifacts / "gate", artifacts / "pca", keep_ratio=0.5, bits=8, group_size=8, **small),
        ),
    }


def shipped() -> dict:
    """The shipped compressors of the default model, as `caches` gives them."""
    exact = {"window": 10000}
    return {
        name: (lambda name=name: load_cache(PRETRAINED_DIR / name, **exact), lambda name=name, settings=settings: load_cache(PRETRAINED_DIR / name, **settings))
        for name, settings in (("smollm2-135m-instruct-gate", {"ratio": 4}), ("smollm2-135m-instruct-sidecar-8x", {}), ("smollm2-135m-instruct-pca-2x", {}), ("smollm2-135m-instruct-kvsplice-2x", {}))
    }


def prompt(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by a third."""
    ids = torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    return ids, mask


def generate(model, cache, ids, mask) -> list:
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :].tolist()


def main(path: str, length: int, artifacts: str) -> None:
    model = kvcompress.enable(AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"), attn_implementation="sdpa").eval())
    ids, mask = prompt(model, length)
    dense = generate(model, DynamicCache(), ids, mask)
    results = {"equal dense": {}, "tokens": {}, "kv heads held": {}}
    for name, (lossless, compressing) in (shipped() if artifacts == "shipped" else caches(Path(artifacts))).items():
        results["equal dense"][name] = generate(model, lossless(), ids, mask) == dense
        cache = compressing()
        results["tokens"][name] = generate(model, cache, ids, mask)
        results["kv heads held"][name] = cache.layers[0].tail["keys"].shape[1]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results["kv heads held"])
    if dist.get_rank() == 0:
        print("RESULTS " + json.dumps(results | {"kv heads held": gathered}), flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without interpreter finalization: with torch 2.13's gloo, a rank that finalizes aborts now and then
    # ("terminate called without an active exception") even after destroy_process_group, plain transformers generate
    # included (1 run in 40 here; pytorch/pytorch#179291); everything this worker reports is printed and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

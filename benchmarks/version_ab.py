"""Two versions of kvcompress in one process on a GPU: decode tokens/s of the same cache under each, alternating.

    git worktree add /tmp/before HEAD~1   # or any checkout: the directory that holds its kvcompress/ package
    python benchmarks/version_ab.py /tmp/before --only "h2o 8:1" "streamingllm 8:1" [--runs 7] [--steps 16] [--tiny]

Separate commands measure the same dense cache 20% apart on one GPU, and a CPU-bound row (the
per-token eviction caches) moves with whatever else the host runs, so a change to the engine is
measured here within one process: the earlier version is imported as a second package, and each
version's cache is filled once (the model of `gpu_throughput.py`: Llama-3.1-8B shape, random bf16
weights, 32k tokens per row at batch 64) and decoded in runs of `steps` steps, the versions
alternating, each under its own attention function. Prints the medians, each run, and the ratio
to the packed dense of the same process. `kernel_ab.py` does the same for one kernel switched off.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import gpu_throughput as bench
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcompress

CACHES = {  # the gpu_throughput.py rows whose caches both versions build the same way
    "streamingllm 8:1": lambda package: package.StreamingLLMCache(ratio=8),
    "streamingllm 8:1, block 64": lambda package: package.StreamingLLMCache(ratio=8, block_size=64),
    "h2o 8:1": lambda package: package.H2OCache(ratio=8),
    "h2o 8:1, block 64": lambda package: package.H2OCache(ratio=8, block_size=64),
}


def import_as(directory: Path, name: str):
    """The kvcompress package found in `directory`, imported under `name` beside the installed one."""
    spec = importlib.util.spec_from_file_location(name, directory / "kvcompress" / "__init__.py", submodule_search_locations=[str(directory / "kvcompress")])
    if spec is None or not (directory / "kvcompress" / "__init__.py").is_file():
        raise SystemExit(f"{directory} holds no kvcompress/ package: give the root of a checkout of the version to compare.")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def filled(package, make, model, context: int):
    """A cache of `package` that has seen `context` random tokens per row in every layer, as `gpu_throughput.fill` does."""
    AttentionInterface.register("kvcompress_sdpa", package.attention.kvcompress_sdpa)
    cache, config = make(package), model.config
    dim = config.hidden_size // config.num_attention_heads
    for layer_idx in range(config.num_hidden_layers):
        for start in range(0, context, 4096):
            keys = torch.randn(bench.COMPRESSED_BATCH, config.num_key_value_heads, min(4096, context - start), dim, device=model.device, dtype=model.dtype)
            layer = cache.layer(layer_idx)
            layer.update(keys, torch.randn_like(keys))
            layer.after_attention(None, None)
    return cache


def decode(package, model, cache, steps: int) -> float:
    """Tokens/s of `steps` greedy decode steps on `cache`, under `package`'s attention, after one step of warm-up."""
    AttentionInterface.register("kvcompress_sdpa", package.attention.kvcompress_sdpa)
    token = torch.randint(0, model.config.vocab_size, (bench.COMPRESSED_BATCH, 1), device=model.device)
    for step in range(steps + 1):
        if step == 1:
            bench.synchronize(model.device)
            started = time.perf_counter()
        token = model(input_ids=token, **package.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    bench.synchronize(model.device)
    return bench.COMPRESSED_BATCH * steps / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="root of a checkout of the earlier version (the directory holding its kvcompress/)")
    parser.add_argument("--only", nargs="+", required=True, choices=sorted(CACHES), metavar="CACHE", help=f"caches to compare: {', '.join(CACHES)}")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (use --context 2048): checks the pipeline, measures nothing")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("version_ab.py measures decode speed on a GPU; this machine has none (--tiny checks the pipeline on the CPU).")
    versions = {"before": import_as(args.before.resolve(), "kvcompress_before"), "after": kvcompress}
    torch.manual_seed(0)
    with torch.device("cpu" if args.tiny else "cuda"):
        model = kvcompress.enable(LlamaForCausalLM(LlamaConfig(**(bench.TINY if args.tiny else bench.LLAMA_8B), attn_implementation="sdpa")).to(torch.bfloat16).eval())
    model.set_attn_implementation("packed_gqa_sdpa")
    with torch.no_grad():
        dense = bench.decode(model, bench.fill(DynamicCache(), model, bench.DENSE_BATCH, args.context), bench.DENSE_BATCH, args.steps, repeats=args.runs)
    bench.free_memory(model.device)
    print(f"packed dense, batch {bench.DENSE_BATCH}: {dense:.0f} tokens/s", flush=True)
    model.set_attn_implementation("kvcompress_sdpa")
    for name in args.only:
        with torch.no_grad():
            caches = {tag: filled(package, CACHES[name], model, args.context) for tag, package in versions.items()}
            speeds = {tag: [] for tag in versions}
            for _ in range(args.runs):
                for tag, package in versions.items():
                    speeds[tag].append(decode(package, model, caches[tag], args.steps))
        for tag, runs in speeds.items():
            median = statistics.median(runs)
            print(f"{name}, {tag}: {median:.0f} tokens/s ({median / dense:.2f}x packed dense); runs {[round(run) for run in runs]}", flush=True)
        del caches
        bench.free_memory(model.device)
    AttentionInterface.register("kvcompress_sdpa", kvcompress.attention.kvcompress_sdpa)


if __name__ == "__main__":
    main()

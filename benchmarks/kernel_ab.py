"""One of kvcompress's GPU kernels on and off in one process: decode tokens/s per cache, alternating.

    python benchmarks/kernel_ab.py tail_attention --only pca kvsplice "gates x pca" [--runs 3] [--steps 16]

Separate commands measure the same dense cache 20% apart on one GPU (the first cache a process runs is
slow), so a change's effect is measured here within one process: the model of `gpu_throughput.py`
(Llama-3.1-8B shape, random bf16 weights) and each cache filled once, then runs of `steps` decode
steps with the kernel module's `available` patched to say no (the PyTorch path) and left alone,
alternating, `runs` of each. Prints the medians and their ratio to the packed dense of the same process.
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import gpu_throughput as bench
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcompress

KERNELS = ["tail_attention", "latent_attention", "scored_attention", "token_step"]  # the modules whose kernels say where they run

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=KERNELS, help="the kvcompress module whose `available` is patched")
    parser.add_argument("--only", nargs="+", required=True, metavar="PREFIX", help="caches of gpu_throughput.py whose names start with these")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (use --context 2048): checks the pipeline, measures nothing")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"kvcompress.{args.kernel}")
    available = module.available
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    with device:
        model = kvcompress.enable(LlamaForCausalLM(LlamaConfig(**(bench.TINY if args.tiny else bench.LLAMA_8B), attn_implementation="sdpa")).to(torch.bfloat16).eval())
    dim = model.config.hidden_size // model.config.num_attention_heads
    cases = bench.caches(args.context, bench.synthetic_artifacts(model, key_rank=dim // 8 - 1, composed_rank=dim // 2), dim)
    packed_dense = f"dense, batch {bench.DENSE_BATCH}, {bench.PACKED}"
    names = [packed_dense] + [name for name in cases if name.startswith(tuple(args.only))]
    reference = None
    for name in names:
        batch, tokens, factory = cases[name]
        model.set_attn_implementation("packed_gqa_sdpa" if name.endswith(bench.PACKED) else "kvcompress_sdpa")
        cache = bench.fill(factory(), model, batch, tokens)
        bench.decode(model, cache, batch, 4)
        speeds = {"off": [], "on": []}
        for _ in range(args.runs):
            for mode in speeds:
                module.available = available if mode == "on" else (lambda *_: False)
                speeds[mode].append(bench.decode(model, cache, batch, args.steps, warmup=1))
        module.available = available
        off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
        reference = reference or on
        print(f"{name}: {args.kernel} off {off:.0f} tokens/s ({off / reference:.2f}x packed dense), on {on:.0f} ({on / reference:.2f}x)", flush=True)
        del cache
        bench.free_memory(device)


if __name__ == "__main__":
    main()

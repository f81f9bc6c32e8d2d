"""Decode time per token of each cache against `DynamicCache`, measured in the same run.

    python benchmarks/decode_speed.py [--model PATH] [--contexts 128 1536] [--new-tokens 32] [--repeats 3] [--compressors DIR ...] \\
        [--update-docs [docs/benchmarks.md]]

For each context length, every cache prefills the same prompt and then decodes `--new-tokens`
tokens one forward at a time; caches take turns within each repeat (so drift in machine load
hits all of them alike) and the median over repeats is reported. "core" is a StreamingLLM cache
whose budget covers the whole sequence: nothing is compressed, so its extra time is the overhead
of the shared machinery (routing, bookkeeping) alone. "block 16" caches evict 16 tokens at a time
(holding up to 15 tokens of their budget less) and rebuild their table 16x less often.
`--compressors` adds fitted compressors (`kvcompress calibrate --output DIR`). `--update-docs` writes
the table into the 'decode' block of docs/benchmarks.md (or of the page given).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from doc_block import add_update_docs, update_block
from transformers import DynamicCache

import kvcompress
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import CacheSpec, cache_nbytes


def caches_for(context: int, new_tokens: int, compressors: list[str], baselines: bool = True) -> dict:
    fitted = {spec.label: spec.build for spec in map(CacheSpec.fitted, compressors)}
    if not baselines:
        return {"dense (DynamicCache)": DynamicCache} | fitted
    return {
        "dense (DynamicCache)": DynamicCache,
        "core (no compression)": lambda: kvcompress.StreamingLLMCache(budget=context + new_tokens),
        "streamingllm 4:1": lambda: kvcompress.StreamingLLMCache(ratio=4),
        "streamingllm 8:1": lambda: kvcompress.StreamingLLMCache(ratio=8),
        "h2o 4:1": lambda: kvcompress.H2OCache(ratio=4),
        "h2o 8:1": lambda: kvcompress.H2OCache(ratio=8),
        "streamingllm 8:1, block 16": lambda: kvcompress.StreamingLLMCache(ratio=8, block_size=16),
        "h2o 8:1, block 16": lambda: kvcompress.H2OCache(ratio=8, block_size=16),
    } | fitted


@torch.no_grad()
def decode_seconds_per_token(model, prompt: torch.Tensor, cache, new_tokens: int) -> tuple[float, int, int]:
    logits = model(input_ids=prompt, **kvcompress.cache_kwargs(cache)).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, **kvcompress.cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    seconds = (time.perf_counter() - started) / new_tokens
    return (seconds, *cache_nbytes(cache))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 1536])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compressors", nargs="+", default=[], metavar="DIR", help="fitted compressor directories to time too")
    parser.add_argument("--no-baselines", action="store_true", help="time only dense and the --compressors")
    add_update_docs(parser, "benchmarks.md", "decode")
    args = parser.parse_args(argv)

    model, tokenizer = kvcompress.load_model(args.model)
    ids = tokenizer(heldout_text()).input_ids
    print(f"model {model.config.name_or_path}, {model.dtype}, device {model.device}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")
    lines = ["| context | cache | ms/token | vs dense | held MiB | dense MiB |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for context in args.contexts:
        prompt = torch.tensor([ids[:context]], device=model.device)
        factories = caches_for(context, args.new_tokens, args.compressors, baselines=not args.no_baselines)
        runs = {name: [] for name in factories}
        decode_seconds_per_token(model, prompt, DynamicCache(), 4)  # warm-up
        for _ in range(args.repeats):
            for name, factory in factories.items():
                runs[name].append(decode_seconds_per_token(model, prompt, factory(), args.new_tokens))
        dense = statistics.median(run[0] for run in runs["dense (DynamicCache)"])
        for name, results in runs.items():
            seconds = statistics.median(run[0] for run in results)
            held, dense_bytes = results[-1][1:]
            lines.append(f"| {context} | {name} | {1000 * seconds:.1f} | {seconds / dense:.2f}x | {held / 2**20:.2f} | {dense_bytes / 2**20:.2f} |")
            print(lines[-1], flush=True)
    if args.update_docs:
        update_block(Path(args.update_docs), "decode", "\n".join(lines))
        print(f"updated {args.update_docs}")


if __name__ == "__main__":
    main()

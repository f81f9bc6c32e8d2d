"""The `kvcompress` command line: `generate` and `evaluate`."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from .data import heldout_text
from .evaluate import CACHE_CLASSES, DEPTHS, CacheSpec, build_cache, cache_nbytes, evaluate, format_table, passkey_context, rows_to_json


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local path or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=None, help="text file or datasets name (default: shared WikiText-2 validation)")


def _cache_from_arguments(args):
    if args.cache != "dense" and (args.ratio is None) == (args.budget is None):
        raise SystemExit(f"error: --cache {args.cache} needs exactly one of --ratio or --budget")
    return build_cache(args.cache, ratio=args.ratio, budget=args.budget)


def _generate(args) -> None:
    from kvcompress import load_model
    from kvcompress.cache import CompressedCache

    model, tokenizer = load_model(args.model)
    if args.prompt:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
        expected = None
    else:  # the demo: find a pass key hidden in ~1.5k tokens of prose
        expected = random.Random(args.seed).randint(10000, 99999)
        haystack = tokenizer(heldout_text(args.data)).input_ids
        context, question = passkey_context(tokenizer, haystack, args.context_tokens, args.depth, expected)
        prompt = context + question
        print(f"Prompt: {args.context_tokens} tokens of WikiText with a pass key hidden at depth {args.depth}.")
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    cache = _cache_from_arguments(args)
    started = time.perf_counter()
    output = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    held, dense = cache_nbytes(cache)
    print(f"Cache: {cache!r}" if isinstance(cache, CompressedCache) else f"Cache: {type(cache).__name__}")
    print(f"Answer: {answer.strip()}")
    if expected is not None:
        print(f"Expected pass key: {expected} -> {'found' if str(expected) in answer else 'NOT found'}")
    print(f"KV cache held: {held / 2**20:.2f} MiB vs dense {dense / 2**20:.2f} MiB, compression {dense / held:.2f}:1 ({seconds:.1f} s)")


def _evaluate(args) -> None:
    from kvcompress import load_model

    specs = [CacheSpec("dense")] if "dense" in args.caches else []
    specs += [CacheSpec(method, ratio) for method in args.caches if method != "dense" for ratio in args.ratios]
    model, tokenizer = load_model(args.model)
    rows = evaluate(
        model, tokenizer, specs, heldout_text(args.data), ppl_tokens=args.ppl_tokens, ppl_chunk=args.ppl_chunk,
        passkey_tokens=args.passkey_tokens, depths=args.depths, trials=args.trials,
    )
    table = format_table(rows, args.ppl_tokens, args.passkey_tokens)
    print(f"\nmodel: {model.config.name_or_path}; streaming PPL on {args.ppl_tokens} held-out tokens in chunks of "
          f"{args.ppl_chunk}; passkey at {args.passkey_tokens} tokens, {args.trials} trials per depth; memory at the end of a passkey run\n")
    print(table)
    if args.output:
        Path(args.output).write_text(rows_to_json(rows))
        print(f"\nwrote {args.output}")
    if args.plot:
        from .plots import plot_quality_vs_compression

        print(f"wrote {plot_quality_vs_compression(rows, args.plot, title=str(model.config.name_or_path).split('/')[-1])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description="KV-cache compression for HuggingFace causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate with a compressed cache and report the memory it held")
    generate.add_argument("prompt", nargs="?", help="a user message (default: the passkey-retrieval demo)")
    _add_model_arguments(generate)
    generate.add_argument("--cache", choices=sorted(CACHE_CLASSES), default="h2o")
    generate.add_argument("--ratio", type=float, default=None, help="compression ratio, e.g. 4 for 4:1")
    generate.add_argument("--budget", type=int, default=None, help="tokens kept per layer and KV head")
    generate.add_argument("--max-new-tokens", type=int, default=16)
    generate.add_argument("--context-tokens", type=int, default=1536, help="passkey demo: prompt length")
    generate.add_argument("--depth", type=float, default=0.5, help="passkey demo: where the key is hidden (0..1)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=_generate)

    evaluate_ = commands.add_parser("evaluate", help="streaming perplexity, passkey retrieval and memory of several caches")
    _add_model_arguments(evaluate_)
    evaluate_.add_argument("--caches", nargs="+", default=["dense", "streamingllm", "h2o"], choices=sorted(CACHE_CLASSES))
    evaluate_.add_argument("--ratios", nargs="+", type=float, default=[2, 4, 8])
    evaluate_.add_argument("--ppl-tokens", type=int, default=1024)
    evaluate_.add_argument("--ppl-chunk", type=int, default=32)
    evaluate_.add_argument("--passkey-tokens", type=int, default=1536)
    evaluate_.add_argument("--depths", nargs="+", type=float, default=list(DEPTHS))
    evaluate_.add_argument("--trials", type=int, default=2, help="passkey prompts per depth")
    evaluate_.add_argument("--output", default=None, help="also write the results as JSON")
    evaluate_.add_argument("--plot", default=None, help="also plot quality vs compression to this PNG")
    evaluate_.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())

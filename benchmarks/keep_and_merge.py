"""Keep-and-merge against keeping and merging alone, at the same measured memory: the ablation of `SidecarCache(mode=...)`.

    python benchmarks/keep_and_merge.py [--gate DIR_OR_HUB_ID] [--sidecar DIR_OR_HUB_ID] [--ratios 8 16] [--device cuda] [--update-docs]

At each target ratio every cache holds the same measured bytes (dense over held, at the end of the
1,536-token pass-key prompt): StreamingLLM and H2O by their budget, the gates, keep-and-merge and pure
merging by a keep ratio (or exact window) found by bisection on that measurement. Keep-and-merge runs
with attention matching (N:1, the closed form) and, where its N:k fits the budget, with the trained
network. The ablation rows ("gates' keep ratio + ...") keep what the gates keep and add the merged
slots, at the memory that costs: what merging adds. Tasks: streaming perplexity, the evaluator's pass key at 1.5k and 6k tokens, the same
number in held-out wordings (`kvcompress.evaluation.tasks.PHRASINGS`) and multi-key, all on held-out prose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from doc_block import add_update_docs, update_block
from quality import Settings, environment, prompts
from tqdm.auto import tqdm
from transformers import DynamicCache

import kvcompress
from kvcompress import GatedCache, H2OCache, SidecarCache, StreamingLLMCache
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import answer, cache_nbytes, streaming_perplexity
from kvcompress.evaluation.tasks import heldout_passkey_prompts, score
from kvcompress.gate import GateCompressor
from kvcompress.sidecar import SidecarCompressor, SidecarNetwork

TASKS = ("ppl", "passkey", "passkey_heldout", "multikey", "passkey_long", "passkey_heldout_long")


def closed_form(sidecar: SidecarCompressor, window: int, slots: int) -> SidecarCompressor:
    """An N:k sidecar artifact whose network is untrained (so it *is* attention matching), with `sidecar`'s reference queries and gates."""
    network = SidecarNetwork(sidecar.network.shape["num_layers"], sidecar.network.shape["num_heads"], sidecar.network.shape["head_dim"], window, slots)
    config = {name: value for name, value in sidecar.config.items() if name not in ("sidecar", "gates", "label", "training", "metrics")}
    tensors = sidecar.tensors
    bare = SidecarCompressor.from_network(network, tensors["reference_queries"], tensors["reference_offsets"], tensors["rope.inv_freq"], config)
    return bare.with_gates(sidecar.gate)


def measured_ratio(model, tokenizer, build, prompt) -> float:
    cache = build()
    answer(model, tokenizer, cache, prompt.context, prompt.question, 1)
    held, dense = cache_nbytes(cache)
    return dense / held


def matched(model, tokenizer, make, target: float, prompt, low: float = 1e-4, high: float = 1.0, steps: int = 7):
    """`make(knob)` with the knob (a keep ratio) that holds `target`:1 on `prompt`, by bisection (a larger knob holds more)."""
    for _ in range(steps):
        middle = (low * high) ** 0.5  # geometric: keep ratios span orders of magnitude
        try:
            ratio = measured_ratio(model, tokenizer, lambda: make(middle), prompt)
        except ValueError:
            ratio = 0.0  # infeasible: treat as too much memory
        low, high = (middle, high) if ratio >= target else (low, middle)
    return lambda: make(low)


def grid(args, model, tokenizer, reference) -> tuple[list[tuple[str, float, callable]], list[str]]:
    """(cache, target ratio, build) for every cache that holds the target at the reference prompt, and those left out."""
    gate = GateCompressor.from_pretrained(args.gate)
    sidecar = SidecarCompressor.from_pretrained(args.sidecar).with_gates(gate)
    single = closed_form(sidecar, sidecar.window, 1)
    rows, skipped = [("dense", 1.0, DynamicCache)], []
    for target in args.ratios:
        window = 64 if target <= 8 else 32  # at 16:1 a 64-token window alone nearly fills the budget at 1.5k
        rows += [("streamingllm", target, lambda t=target: StreamingLLMCache(ratio=t)), ("h2o", target, lambda t=target: H2OCache(ratio=t))]
        candidates = {
            "gates": lambda keep, w=window: GatedCache(gate, keep_ratio=keep, window=w, block_size=sidecar.window),
            f"keep-and-merge {sidecar.window}:1 attention matching": lambda keep, w=window: SidecarCache(single, keep_ratio=keep, window=w, merge="attention_matching"),
            f"keep-and-merge {sidecar.window}:{sidecar.slots} sidecar": lambda keep, w=window: SidecarCache(sidecar, keep_ratio=keep, window=w),
        }
        builds = {name: matched(model, tokenizer, make, target, reference) for name, make in candidates.items()}
        builds[f"merge {sidecar.window}:{sidecar.slots} sidecar"] = lambda t=target: SidecarCache(sidecar, mode="merge", ratio=t, context=args.short)
        keep = builds["gates"]().keep_ratio  # the ablation: what merging adds to the gates' own tokens, at more memory
        builds[f"gates' keep ratio + {sidecar.window}:1 attention matching"] = lambda k=keep, w=window: SidecarCache(single, keep_ratio=k, window=w, merge="attention_matching")
        builds[f"gates' keep ratio + {sidecar.window}:{sidecar.slots} sidecar"] = lambda k=keep, w=window: SidecarCache(sidecar, keep_ratio=k, window=w)
        for name, build in builds.items():
            try:
                if measured_ratio(model, tokenizer, build, reference) < 0.9 * target and not name.startswith("gates'"):
                    raise ValueError("holds more")
            except ValueError:
                skipped.append(f"{name} at {target:g}:1")
                continue
            rows.append((name, target, build))
    return rows, skipped


@torch.no_grad()
def run(args) -> dict:
    """Every cache of the grid on every task; the results so far are saved to `args.output` after each cache."""
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings(short=args.short, long=args.long, trials=2)
    ppl_ids, tasks = prompts(tokenizer, heldout_text(), settings)
    hay = tokenizer(heldout_text()).input_ids[settings.ppl_tokens :]
    tasks = {
        "passkey": tasks["passkey"], "passkey_heldout": heldout_passkey_prompts(tokenizer, hay, settings.short, (0.2, 0.5, 0.8)),
        "multikey": tasks["multikey"], "passkey_long": tasks["passkey_long"], "passkey_heldout_long": heldout_passkey_prompts(tokenizer, hay, settings.long, (0.5,)),
    }
    reference = tasks["passkey"][len(tasks["passkey"]) // 2]
    started, results = time.perf_counter(), []
    caches, skipped = grid(args, model, tokenizer, reference)

    def saved() -> dict:
        env = environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}
        data = {"environment": env, "settings": {"short": args.short, "long": args.long}, "skipped": skipped, "rows": results}
        Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
        return data

    for name, target, build in caches:
        row, clock = {"cache": name, "target": target, "repr": repr(build())}, time.perf_counter()
        row["ppl"] = streaming_perplexity(model, ppl_ids.to(model.device), build()).perplexity
        for task, task_prompts in tasks.items():
            scores = []
            for prompt in tqdm(task_prompts, desc=f"{name} {target:g}:1 {task}", leave=False):
                cache = build()
                scores.append(score(prompt, answer(model, tokenizer, cache, prompt.context, prompt.question, 16, 1024 if "long" in task else None)))
                if prompt is reference:
                    held, dense = cache_nbytes(cache)
                    row["measured_ratio"] = dense / held
            row[task] = statistics.mean(scores)
        row["seconds"] = time.perf_counter() - clock
        results.append(row)
        saved()
        tqdm.write(f"{name} {target:g}:1 " + ", ".join(f"{task} {row[task]:.3f}" for task in TASKS) + f", measured {row['measured_ratio']:.2f}:1")
    return saved()


def table(data: dict) -> str:
    short, long = data["settings"]["short"], data["settings"]["long"]
    header = ["target", "cache", "measured ratio", "PPL", f"pass key @{short}", f"held-out wordings @{short}", f"multi-key @{short}", f"pass key @{long}", f"held-out wordings @{long}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in data["rows"]:
        cells = [f"{row['target']:g}:1", row["cache"], f"{row['measured_ratio']:.2f}", f"{row['ppl']:.2f}"] + [f"{row[task]:.2f}" for task in TASKS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    env = data["environment"]
    return "\n".join([
        f"Generated by `python benchmarks/keep_and_merge.py` ({env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['model']} "
        f"in {env['dtype'].removeprefix('torch.')}; {env['minutes']} min). Scores are shares of answers found: 10 pass-key prompts at {short} tokens, "
        f"12 in held-out wordings (4 wordings x 3 depths), 4 multi-key, 3 pass keys and 4 held-out wordings at {long}; PPL on 1,024 held-out tokens.",
        "", *lines, "", f"Left out (the merged slots alone exceed the budget at {short} tokens): {', '.join(data['skipped']) or 'none'}.",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", default="kvcompress/smollm2-135m-instruct-gate", metavar="DIR_OR_HUB_ID")
    parser.add_argument("--sidecar", default="kvcompress/smollm2-135m-instruct-sidecar-8x", metavar="DIR_OR_HUB_ID")
    parser.add_argument("--ratios", nargs="+", type=float, default=[8, 16])
    parser.add_argument("--short", type=int, default=1536)
    parser.add_argument("--long", type=int, default=6144)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="docs/benchmark/keep_and_merge.json")
    parser.add_argument("--render", default=None, metavar="JSON", help="only print (and with --update-docs, write) the table of a saved run")
    add_update_docs(parser, "methods.md", "keep-and-merge")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.render).read_text()) if args.render else run(args)
    print(table(data))
    if args.update_docs:
        update_block(Path(args.update_docs), "keep-and-merge", table(data))


if __name__ == "__main__":
    main()

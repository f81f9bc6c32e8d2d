"""Keep-and-merge against keeping and merging alone, at the same measured memory: the ablation of `SidecarCache(mode=...)`.

    python benchmarks/keep_and_merge.py [--gate DIR_OR_HUB_ID] [--sidecar DIR_OR_HUB_ID] [--ratios 8 16] [--device cuda] [--update-docs]
    python benchmarks/keep_and_merge.py --only "CACHE" ... --into docs/benchmark/keep_and_merge.json   # some rows, into a saved run

At each target ratio every cache holds the same measured bytes (dense over held) at both pass-key
lengths: at the end of a 1,536-token and of a 6,144-token prompt. StreamingLLM, H2O and the ``ratio=`` rows
(the gates' budget, and keep-and-merge's, where merged slots and exact tokens share one budget) by their
budget, pure merging by its window for that length, the gates and keep-and-merge by a keep ratio found for each
length by bisection on that measurement (`MatchedSpec`): a keep ratio holds another share of a longer
context, so one matched at 1.5k tokens would compare at other memory at 6k. Perplexity streams 1,024
tokens with the 1.5k setting (at 1,024 tokens the exact sink, window and tail alone hold more than some
targets allow); the table gives the ratio measured there too. Keep-and-merge runs
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
from quality import MatchedSpec, Settings, environment, prompts, reference_prompts, reference_runs
from tqdm.auto import tqdm
from transformers import DynamicCache

import kvcompress
from kvcompress import GatedCache, H2OCache, SidecarCache, StreamingLLMCache
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import answer, cache_nbytes, streaming_perplexity
from kvcompress.evaluation.tasks import score
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


class FixedSpec:
    """A cache whose memory follows the length by itself (a budget ratio, or a window set for the context), built for a
    context as `MatchedSpec` builds one."""

    def __init__(self, build):
        self.build = build


def grid(args, reference, contexts: tuple[int, ...]) -> tuple[list[tuple[str, float, object]], list[str]]:
    """(cache, target ratio, spec) for every cache that holds the target at every length of `contexts`, and those left out;
    `reference` is `reference_runs`'s measurement, on which keep ratios are matched."""
    gate = GateCompressor.from_pretrained(args.gate)
    sidecar = SidecarCompressor.from_pretrained(args.sidecar).with_gates(gate)
    single, coarse = closed_form(sidecar, sidecar.window, 1), closed_form(sidecar, 2 * sidecar.window, 1)
    rows, skipped = [("dense", 1.0, FixedSpec(lambda context: DynamicCache()))], []
    for target in args.ratios:
        window = 64 if target <= 8 else 32  # at 16:1 a 64-token window alone nearly fills the budget at 1.5k
        rows += [("streamingllm", target, FixedSpec(lambda context, t=target: StreamingLLMCache(ratio=t))),
                 ("h2o", target, FixedSpec(lambda context, t=target: H2OCache(ratio=t))),
                 ("gates, ratio= (budget)", target, FixedSpec(
                     lambda context, t=target, w=window: GatedCache(gate, ratio=t, context=context, window=w, block_size=sidecar.window)))]
        candidates = {
            "gates": lambda keep, w=window: GatedCache(gate, keep_ratio=keep, window=w, block_size=sidecar.window),
            f"keep-and-merge {sidecar.window}:1 attention matching": lambda keep, w=window: SidecarCache(single, keep_ratio=keep, window=w, merge="attention_matching"),
            f"keep-and-merge {sidecar.window}:{sidecar.slots} sidecar": lambda keep, w=window: SidecarCache(sidecar, keep_ratio=keep, window=w),
        }
        specs = {name: MatchedSpec(name, make, target, reference) for name, make in candidates.items()}
        for merge, how in ((single, "attention_matching"), (coarse, "attention_matching"), (sidecar, "sidecar")):  # one budget, merged slots first
            specs[f"keep-and-merge {merge.window}:{merge.slots} {how.replace('_', ' ')}, ratio= (budget)"] = FixedSpec(
                lambda context, t=target, w=window, m=merge, h=how: SidecarCache(m, ratio=t, context=context, window=w, merge=h))
        specs[f"merge {sidecar.window}:{sidecar.slots} sidecar"] = FixedSpec(lambda context, t=target: SidecarCache(sidecar, mode="merge", ratio=t, context=context))
        gates = specs["gates"]  # the ablation: what merging adds to the gates' own tokens, at more memory
        specs[f"gates' keep ratio + {sidecar.window}:1 attention matching"] = FixedSpec(
            lambda context, w=window, g=gates: SidecarCache(single, keep_ratio=g.knob(context), window=w, merge="attention_matching"))
        specs[f"gates' keep ratio + {sidecar.window}:{sidecar.slots} sidecar"] = FixedSpec(
            lambda context, w=window, g=gates: SidecarCache(sidecar, keep_ratio=g.knob(context), window=w))
        for name, spec in tqdm(specs.items(), desc=f"matching {target:g}:1 at {', '.join(map(str, contexts))} tokens", leave=False):
            if args.only and name not in args.only:
                continue
            try:
                for context in contexts:
                    spec.build(context)  # a matched spec's keep ratio is found here
            except ValueError:  # it holds more than the target at some length even keeping nothing, or refuses the ratio
                skipped.append(f"{name} at {target:g}:1")
                continue
            rows.append((name, target, spec))
    if args.only:
        rows, skipped = [row for row in rows if row[0] in args.only], [name for name in skipped if name.rsplit(" at ", 1)[0] in args.only]
    return rows, skipped


@torch.no_grad()
def run(args) -> dict:
    """Every cache of the grid on every task; the results so far are saved to `args.output` after each cache."""
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings(short=args.short, long=args.long, trials=2)
    ppl_ids, found = prompts(tokenizer, heldout_text(), settings, heldout_wordings=True)
    tasks = {task: found[task] for task in ("passkey", "passkey_heldout", "multikey", "passkey_long", "passkey_heldout_long")}
    references = reference_prompts(tasks, settings)
    measured = reference_runs(model, tokenizer, references, settings)
    started, results = time.perf_counter(), []
    caches, skipped = grid(args, measured, (args.short, args.long))
    base = json.loads(Path(args.into).read_text()) if args.into else None  # read once: --output may be the same file

    def saved() -> dict:
        env = environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}
        data = {"environment": env, "settings": {"ppl_tokens": settings.ppl_tokens, "short": args.short, "long": args.long}, "skipped": skipped, "rows": results}
        if base is not None:
            data = into(base, data)
        Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
        return data

    for name, target, spec in caches:
        row, clock = {"cache": name, "target": target, "repr": repr(spec.build(args.short))}, time.perf_counter()
        ppl = streaming_perplexity(model, ppl_ids.to(model.device), spec.build(settings.tokens("ppl")))
        row["ppl"], row["measured_ratio_ppl"] = ppl.perplexity, ppl.dense_nbytes / ppl.nbytes
        for task, task_prompts in tasks.items():
            scores, context = [], settings.tokens(task)
            for prompt in tqdm(task_prompts, desc=f"{name} {target:g}:1 {task}", leave=False):
                cache = spec.build(context)
                scores.append(score(prompt, answer(model, tokenizer, cache, prompt.context, prompt.question, 16, settings.chunk(context))))
                if prompt is references[context]:
                    held, dense = cache_nbytes(cache)
                    row["measured_ratio_long" if context == args.long else "measured_ratio"] = dense / held
            row[task] = statistics.mean(scores)
        if isinstance(spec, MatchedSpec):
            row["knobs"] = spec.knobs
        row["seconds"] = time.perf_counter() - clock
        results.append(row)
        saved()
        tqdm.write(f"{name} {target:g}:1 " + ", ".join(f"{task} {row[task]:.3f}" for task in TASKS) + f", measured {row['measured_ratio']:.2f}:1")
    return saved()


def into(saved: dict, run: dict) -> dict:
    """`run`'s rows put into a `saved` run of the same settings: each replaces the row of its cache and target, or follows
    the last row of its target; the saved environment names the later run and its rows (and no earlier run for them)."""
    if saved["settings"] != run["settings"]:
        raise SystemExit(f"--into: the saved run's settings {saved['settings']} differ from this run's {run['settings']}.")
    rows = list(saved["rows"])
    for row in run["rows"]:
        same = [i for i, old in enumerate(rows) if (old["cache"], old["target"]) == (row["cache"], row["target"])]
        if same:
            rows[same[0]] = row
        else:
            rows.insert(max((i + 1 for i, old in enumerate(rows) if old["target"] <= row["target"]), default=len(rows)), row)
    names = [row["cache"] for row in run["rows"]]
    earlier = [other | {"methods": [name for name in other["methods"] if name not in names]} for other in saved["environment"].get("merged", [])]
    env = saved["environment"] | {"merged": [other for other in earlier if other["methods"]] + [run["environment"] | {"methods": names}]}
    skipped = saved["skipped"] + [name for name in run["skipped"] if name not in saved["skipped"]]
    return saved | {"environment": env, "rows": rows, "skipped": skipped}


def table(data: dict) -> str:
    short, long = data["settings"]["short"], data["settings"]["long"]
    ratios = f"measured ratio @{data['settings']['ppl_tokens']} / @{short} / @{long}"
    header = ["target", "cache", ratios, "PPL", f"pass key @{short}", f"held-out wordings @{short}", f"multi-key @{short}", f"pass key @{long}", f"held-out wordings @{long}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in data["rows"]:
        ratios = " / ".join(f"{row[key]:.2f}" for key in ("measured_ratio_ppl", "measured_ratio", "measured_ratio_long"))
        cells = [f"{row['target']:g}:1", row["cache"], ratios, f"{row['ppl']:.2f}"] + [f"{row[task]:.2f}" for task in TASKS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    env = data["environment"]
    later = "".join(f"; {', '.join(other['methods'])} rows: a later run ({other['device']}; {other['minutes']} min)" for other in env.get("merged", []))
    return "\n".join([
        f"Generated by `python benchmarks/keep_and_merge.py` ({env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['model']} "
        f"in {env['dtype'].removeprefix('torch.')}; {env['minutes']} min{later}). Scores are shares of answers found: 10 pass-key prompts at {short} tokens, "
        f"12 in held-out wordings (4 wordings x 3 depths), 4 multi-key, 3 pass keys and 4 held-out wordings at {long}; PPL on 1,024 held-out tokens.",
        "", *lines, "", "Left out (the budget cannot hold them at one of the lengths: their merged slots, or the exact sink, window and a block's "
        f"slack, alone exceed it): {', '.join(data['skipped']) or 'none'}.",
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
    parser.add_argument("--only", nargs="+", default=None, metavar="CACHE", help="run only these rows of the grid (the table's names)")
    parser.add_argument("--into", default=None, metavar="JSON", help="put the rows run into this saved run (written to --output)")
    parser.add_argument("--render", default=None, metavar="JSON", help="only print (and with --update-docs, write) the table of a saved run")
    add_update_docs(parser, "methods.md", "keep-and-merge")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.render).read_text()) if args.render else run(args)
    print(table(data))
    if args.update_docs:
        update_block(Path(args.update_docs), "keep-and-merge", table(data))


if __name__ == "__main__":
    main()

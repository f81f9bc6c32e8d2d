"""What keep-and-merge's merged slots are worth at the same memory: an ablation of `SidecarCache` with gates.

    python benchmarks/merged_slot_value.py [--sidecar DIR ...] [--shifts 0 0.5 1 2 4 30] [--ratio 8] [--device cuda]

Under one `ratio=` budget (the "keep-and-merge ..., ratio= (budget)" rows of benchmarks/keep_and_merge.py) the merged
slots take their share first and the gates' most probable tokens the rest. Here every merged slot's attention-logit
bias is lowered by a shift s: at s = 0 the cache as it is; at large s the slots still hold their memory but take no
attention, so the row is the gates with the merged slots' share of the budget left empty. If merging were worth its
bytes, PPL would rise with s. Rows: the gates' budget alone, then the shipped sidecar's closed form (attention matching,
32:1) and each trained `--sidecar` (an artifact with gates, e.g. from `kvcompress calibrate --method sidecar --slots 1
--gates ...`) at each shift; streaming perplexity of the held-out text at the 1.5k setting, as keep_and_merge.py.
It wraps the merge: an experiment, not a cache option (docs/methods.md, keep-and-merge).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from keep_and_merge import closed_form
from quality import Settings, environment, prompts
from tqdm.auto import tqdm

import kvcompress
from kvcompress import GatedCache, SidecarCache, SidecarCompressor
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import streaming_perplexity
from kvcompress.gate import GateCompressor
from kvcompress.sidecar import SidecarMerge
from kvcompress.slots import SYNTHESIZED


class ShiftedMerge(SidecarMerge):
    """The sidecar's merge, its merged slots' logit biases lowered by `shift`."""

    def __init__(self, compressor: SidecarCompressor, merge: str, shift: float):
        super().__init__(compressor, merge)
        self.shift = shift

    def merge(self, layer, blocks):
        slots = super().merge(layer, blocks)
        slots.bias = slots.bias - self.shift * (slots.token_ids == SYNTHESIZED)
        return slots


def shifted(cache: SidecarCache, shift: float) -> SidecarCache:
    cache.encoding = ShiftedMerge(cache.compressor, cache.encoding.merging, shift)
    return cache


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", default="kvcompress/smollm2-135m-instruct-gate", metavar="DIR_OR_HUB_ID")
    parser.add_argument("--closed-form", default="kvcompress/smollm2-135m-instruct-sidecar-8x", metavar="DIR_OR_HUB_ID",
                        help="the sidecar whose reference queries the 32:1 attention-matching row uses")
    parser.add_argument("--sidecar", nargs="*", default=[], metavar="DIR_OR_HUB_ID", help="trained sidecars with gates, each a row per shift")
    parser.add_argument("--shifts", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0, 4.0, 30.0])
    parser.add_argument("--ratio", type=float, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="docs/benchmark/merged_slot_value.json")
    args = parser.parse_args(argv)
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings, started = Settings(), time.perf_counter()
    ppl_ids = prompts(tokenizer, heldout_text(), settings)[0].to(model.device)
    context = settings.tokens("ppl")
    gate = GateCompressor.from_pretrained(args.gate)
    bundled = SidecarCompressor.from_pretrained(args.closed_form).with_gates(gate)
    merges = {f"attention matching {bundled.window}:1": (closed_form(bundled, bundled.window, 1), "attention_matching")}
    merges |= {f"sidecar {path}": (SidecarCompressor.from_pretrained(path), "sidecar") for path in args.sidecar}

    def run(name: str, shift: float | None, cache) -> dict:
        ppl = streaming_perplexity(model, ppl_ids, cache)
        row = {"merge": name, "shift": shift, "ppl": ppl.perplexity, "measured_ratio_ppl": ppl.dense_nbytes / ppl.nbytes}
        tqdm.write(f"{name}, shift {shift}: PPL {row['ppl']:.2f}, measured {row['measured_ratio_ppl']:.2f}:1")
        return row

    rows = [run("gates alone", None, GatedCache(gate, ratio=args.ratio, context=context, window=64, block_size=bundled.window))]
    for name, (compressor, how) in tqdm(merges.items(), desc="merges"):
        if compressor.gate is None:
            raise SystemExit(f"--sidecar {name.removeprefix('sidecar ')} carries no gates: calibrate it with --gates, or bundle them (with_gates).")
        for shift in args.shifts:
            rows.append(run(name, shift, shifted(SidecarCache(compressor, ratio=args.ratio, context=context, window=64, merge=how), shift)))
    data = {"environment": environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}, "ratio": args.ratio, "rows": rows}
    Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nKeep-and-merge at {args.ratio:g}:1 (one budget), merged slots' biases lowered by a shift ({data['environment']['device']}):")
    print("| merge | shift | PPL | measured ratio |\n|---|---|---|---|")
    for row in rows:
        shift = "-" if row["shift"] is None else f"{row['shift']:g}"
        print(f"| {row['merge']} | {shift} | {row['ppl']:.2f} | {row['measured_ratio_ppl']:.2f} |")


if __name__ == "__main__":
    main()

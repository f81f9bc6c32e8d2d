"""What the gates evict, merged into the slots they keep (D2O, Wan et al. 2024; CaM, Zhang et al. 2024): an ablation of keep-and-merge.

    python benchmarks/merge_into_kept.py [--thresholds 0.95 0.9 0.8 0.6 0] [--passkey] [--device cuda]

Keep-and-merge (`SidecarCache` with gates) spends slots on merged super-tokens; here merging costs no slot. Under
the gates' 8:1 budget (`GatedCache(ratio=8)`, the "gates, ratio= (budget)" row of benchmarks/keep_and_merge.py),
every token or store slot the budget drops joins the exact slot of its head whose key is nearest by cosine, where
their similarity reaches a threshold: its value averaged in, weighted by the tokens each stands for. Variants:
``+mass`` sets the slot's attention-logit bias to the log of that count (n tokens of equal keys weigh n times one:
exact where keys agree), ``+keys`` averages the key too; without ``+mass`` the average runs with equal weights and
no bias (D2O's). Memory is the gates' own (the bias adds 4 bytes a slot). It wraps the engine's `_compress`: an
experiment, not a cache, since the numbers said not to ship it (docs/methods.md, keep-and-merge).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from quality import Settings, environment, prompts
from tqdm.auto import tqdm

import kvcompress
from kvcompress import GatedCache
from kvcompress.cache import CompressedLayer
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import answer, streaming_perplexity
from kvcompress.evaluation.tasks import score
from kvcompress.gate import GateCompressor
from kvcompress.policies import Encoding

VARIANTS = ("values+mass", "values+keys+mass", "values", "values+keys")


class WithBias(Encoding):
    """Plain keys and values with a per-slot logit bias (zero until a merge sets it)."""

    uses_bias = True


def merge_evicted(layer: CompressedLayer, before: dict, threshold: float, variant: str) -> None:
    """Merge every token-head that `before` (the store and tail ahead of a `_compress`) held and the layer no longer holds
    into its head's nearest exact store slot, where their keys' cosine similarity reaches `threshold`."""
    store, tail = layer.store, layer.tail
    for row in range(store["token_ids"].shape[0]):
        for head in range(store["token_ids"].shape[1]):
            ids, keys = store["token_ids"][row, head], store["keys"][row, head].float()
            gone = (before["token_ids"][row, head] >= 0) & ~torch.isin(before["token_ids"][row, head], torch.cat([ids, tail["token_ids"][row, head]]))
            if not gone.any() or not (ids >= 0).any():
                continue
            similarity = torch.nn.functional.normalize(before["keys"][row, head][gone].float(), dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
            best, nearest = similarity.masked_fill(ids[None] < 0, -2.0).max(-1)
            close = best >= threshold
            if not close.any():
                continue
            nearest, count = nearest[close], before["weight"][row, head][gone][close]
            weight = store["bias"][row, head].exp()
            if "mass" not in variant:  # a running average: each slot and each token weigh one
                weight, count = torch.ones_like(weight), torch.ones_like(count)
            total = weight + torch.zeros_like(weight).index_add_(0, nearest, count)
            for name in ("values", "keys") if "keys" in variant else ("values",):
                evicted = before[name][row, head][gone][close].float() * count[:, None]
                mixed = store[name][row, head].float() * weight[:, None] + torch.zeros_like(keys).index_add_(0, nearest, evicted)
                store[name][row, head] = (mixed / total[:, None]).to(store[name].dtype)
            if "mass" in variant:
                store["bias"][row, head] = total.log().to(store["bias"].dtype)


@contextlib.contextmanager
def merging(threshold: float | None, variant: str):
    """While active, each `_compress` of a layer merges what it evicts (None: the gates as they are)."""
    original = CompressedLayer._compress

    def compress(layer: CompressedLayer) -> None:
        store, tail = layer.store, layer.tail
        before = {name: torch.cat([store[name], tail[name]], dim=2).clone() for name in ("token_ids", "keys", "values")}
        before["weight"] = torch.cat([store["bias"].exp(), torch.ones_like(tail["token_ids"], dtype=store["bias"].dtype)], dim=2)
        original(layer)
        merge_evicted(layer, before, threshold, variant)

    if threshold is not None:
        CompressedLayer._compress = compress
    try:
        yield
    finally:
        CompressedLayer._compress = original


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", default="kvcompress/smollm2-135m-instruct-gate", metavar="DIR_OR_HUB_ID")
    parser.add_argument("--ratio", type=float, default=8)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.95, 0.9, 0.8, 0.6, 0.0])
    parser.add_argument("--passkey", action="store_true", help="also the pass key at 1.5k and 6k tokens, for the gates and the merge of lowest perplexity")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="docs/benchmark/merge_into_kept.json")
    args = parser.parse_args(argv)
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings(trials=2)
    ppl_ids, tasks = prompts(tokenizer, heldout_text(), settings)
    gate, started = GateCompressor.from_pretrained(args.gate), time.perf_counter()

    def cache(context: int) -> GatedCache:
        gated = GatedCache(gate, ratio=args.ratio, context=context, window=64, block_size=32)
        gated.encoding = WithBias()
        return gated

    def run(threshold: float | None, variant: str, passkey: bool) -> dict:
        row = {"variant": variant, "threshold": threshold}
        with merging(threshold, variant):
            ppl = streaming_perplexity(model, ppl_ids.to(model.device), cache(settings.tokens("ppl")))
            row["ppl"], row["measured_ratio_ppl"] = ppl.perplexity, ppl.dense_nbytes / ppl.nbytes
            for task in ("passkey", "passkey_long") if passkey else ():
                context = settings.tokens(task)
                found = [score(p, answer(model, tokenizer, cache(context), p.context, p.question, 16, settings.chunk(context))) for p in tasks[task]]
                row[task] = sum(found) / len(found)
        tqdm.write(f"{variant} >= {threshold}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items() if isinstance(value, float) and key != "threshold"))
        return row

    rows = [run(None, "gates alone", args.passkey)]
    for variant in tqdm(VARIANTS, desc="variants"):
        rows += [run(threshold, variant, False) for threshold in args.thresholds]
    if args.passkey:
        best = min(rows[1:], key=lambda row: row["ppl"])
        rows.append(run(best["threshold"], best["variant"], True))
    data = {"environment": environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}, "ratio": args.ratio, "rows": rows}
    Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nGates at {args.ratio:g}:1, evicted tokens merged into the nearest kept slot ({data['environment']['device']}):")
    print("| variant | threshold | PPL | measured ratio | pass key @1536 | pass key @6144 |\n|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["variant"], "-" if row["threshold"] is None else f"{row['threshold']:g}", f"{row['ppl']:.2f}", f"{row['measured_ratio_ppl']:.2f}"]
        print("| " + " | ".join(cells + [f"{row[task]:.2f}" if task in row else "" for task in ("passkey", "passkey_long")]) + " |")


if __name__ == "__main__":
    main()

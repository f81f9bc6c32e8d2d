"""Gates calibrated with recall statements in one form against several wordings: what retrieval they keep.

    python benchmarks/recall_wordings.py [--long] [--seeds 0 1 2] [--device cuda] [--output docs/benchmark/recall_wordings.json]

Each row calibrates gates with `kvcompress.calibrate(model, tokenizer, "gate", seed=S)` (the command's defaults) on the default
model, once per seed, its recall statements drawn from the first three `TEMPLATES` of `kvcompress.calibration.recall` (one form: "The
locker code is 4711.", as before) or from all of them, and loads them as the shipped gates are (`ratio=8`, `context=`
the prompt's length). Tasks, on held-out prose: streaming perplexity, the evaluator's pass key at 1.5k tokens, the same
number in held-out wordings (`kvcompress.evaluation.tasks.PHRASINGS`), multi-key; with `--long` the pass key and held-out
wordings at 6k too. About 5 minutes per row on 2 CPU cores, 7 to 9 with `--long` (calibration about 2.5 of them). The table gives each wording's
mean over the seeds and, beside it, the lowest and highest seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from quality import Settings, environment, prompts
from tqdm.auto import tqdm

import kvcompress
from kvcompress import GatedCache
from kvcompress.calibration import recall
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import answer, streaming_perplexity
from kvcompress.evaluation.tasks import score

WORDINGS = {"one form": recall.TEMPLATES[:3], "nine wordings": recall.TEMPLATES}


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also the pass key and held-out wordings at 6,144 tokens")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibrate each wording once per seed (kvcompress calibrate --seed)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="docs/benchmark/recall_wordings.json")
    args = parser.parse_args(argv)
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings()
    ppl_ids, found = prompts(tokenizer, heldout_text(), settings, heldout_wordings=True)
    tasks = {task: found[task] for task in ("passkey", "passkey_heldout", "multikey", *(("passkey_long", "passkey_heldout_long") if args.long else ()))}
    rows, started = [], time.perf_counter()
    for (name, templates), seed in tqdm([(wording, seed) for wording in WORDINGS.items() for seed in args.seeds], desc="calibrations"):
        recall.TEMPLATES, calibrated = templates, time.perf_counter()
        try:
            gate, _ = kvcompress.calibrate(model, tokenizer, "gate", seed=seed)
        finally:
            recall.TEMPLATES = WORDINGS["nine wordings"]
        row = {"recall statements": name, "seed": seed, "calibration_seconds": time.perf_counter() - calibrated}
        ppl = streaming_perplexity(model, ppl_ids.to(model.device), GatedCache(gate, ratio=8, context=settings.short))
        row["ppl"], row["measured_ratio_ppl"] = ppl.perplexity, ppl.dense_nbytes / ppl.nbytes
        for task, items in tasks.items():
            context = settings.tokens(task)
            scores = [score(p, answer(model, tokenizer, GatedCache(gate, ratio=8, context=context), p.context, p.question, 16, settings.chunk(context))) for p in items]
            row[task], row[f"{task}_found"] = sum(scores) / len(scores), f"{sum(scores):g} of {len(scores)}"
        tqdm.write(json.dumps(row))
        rows.append(row)
    data = {"environment": environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}, "rows": rows}
    Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
    columns = ["ppl", *tasks]
    print(f"\nmean over seeds {', '.join(map(str, args.seeds))} (lowest to highest)")
    print("\n| recall statements | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for name in WORDINGS:
        values = {column: [row[column] for row in rows if row["recall statements"] == name] for column in columns}
        print(f"| {name} | " + " | ".join(f"{statistics.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in values.values()) + " |")


if __name__ == "__main__":
    main()

"""How close the gates' ``ratio=`` comes to the memory it asks for, on the quality benchmark's reference prompts.

    python benchmarks/ratio_knob.py [--gate DIR_OR_HUB_ID] [--ratios 4 8 16] [--device cuda]

`GatedCache(ratio=R, context=N)` is a budget that grows with the tokens seen (`kvcompress.gate.GateBudget`):
for each ratio and pass-key length this builds the cache as a user would (``context=`` the prompt's
length), feeds the middle pass-key prompt of that length and prints the ratio asked, the ratio
measured right after the prompt (its tail still has room for a block) and the share of old tokens the
budget keeps at least (its keep ratio).
"""

from __future__ import annotations

import argparse

import torch
from quality import Settings, prompts, reference_prompts, reference_runs

import kvcompress
from kvcompress import GatedCache
from kvcompress.corpus import heldout_text


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", default="kvcompress/smollm2-135m-instruct-gate", metavar="DIR_OR_HUB_ID")
    parser.add_argument("--ratios", nargs="+", type=float, default=[4, 8, 16])
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings()
    _, tasks = prompts(tokenizer, heldout_text(), settings)
    references = reference_prompts(tasks, settings)
    measured = reference_runs(model, tokenizer, references, settings)
    print("| ratio= | context= | keep ratio | measured ratio |\n|---|---|---|---|")
    for ratio in args.ratios:
        for context in references:
            cache = GatedCache.from_pretrained(args.gate, ratio=ratio, context=context)
            print(f"| {ratio:g} | {context} | {cache.keep_ratio:.4f} | {measured(context, cache):.2f} |", flush=True)


if __name__ == "__main__":
    main()

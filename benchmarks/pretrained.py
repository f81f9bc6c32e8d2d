"""Measure the pretrained compressors that ship in kvcompress/pretrained/ and write their model cards.

    python benchmarks/pretrained.py                                      # every shipped repository (~50 min on 2 CPU cores)
    python benchmarks/pretrained.py --only smollm2-135m-instruct-gate    # one
    python benchmarks/pretrained.py --render --update-docs                      # only the table in docs/pretrained.md, from the evaluation.json files

For each repository: its network weights are stored in float16 when that leaves the measured perplexity
unchanged (checked here, else they stay float32); then the compressor, and StreamingLLM and H2O at the
compressor's measured memory, answer the same held-out prompts as dense (quality.py's tasks: streaming
perplexity, pass key at 1.5k and 6k tokens, multi-key). The results go to the repository's
`evaluation.json` and its `README.md` model card, whose `model-index` `kvcompress pretrained` lists.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from doc_block import add_update_docs, update_block
from quality import Row, Settings, prompts, run
from safetensors.torch import save_file

import kvcompress
from kvcompress.corpus import DEFAULT_CORPUS_NAME, heldout_text
from kvcompress.evaluation.harness import CacheSpec, streaming_perplexity
from kvcompress.hub import CONFIG_FILE, EVALUATION_FILE, PRETRAINED_DIR, PRETRAINED_NAMESPACE, WEIGHTS_FILE, CompressorArtifact

HALF_PRECISION = ("gates.", "network.", "layers.")  # network weights; RoPE frequencies, probabilities and reference queries stay float32
RATIOS = {"gate": 8}  # the gates' memory is chosen at load time: ratio=8, a budget met from each prompt's length on (context=)
TASKS = ("ppl", "passkey", "passkey_long", "multikey")


def store_float16_if_unchanged(directory: Path, spec: CacheSpec, model, ppl_ids: torch.Tensor) -> str:
    """Rewrite the weights file with float16 network weights if the streaming perplexity stays the same to 4 digits."""
    artifact = CompressorArtifact.from_pretrained(directory)
    if not any(t.dtype == torch.float32 for name, t in artifact.tensors.items() if name.startswith(HALF_PRECISION)):
        return "float16 already"
    full = streaming_perplexity(model, ppl_ids, spec.build()).perplexity
    original = (directory / WEIGHTS_FILE).read_bytes()
    half = {name: t.half() if name.startswith(HALF_PRECISION) else t for name, t in artifact.tensors.items()}
    save_file({name: t.contiguous() for name, t in half.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    reduced = streaming_perplexity(model, ppl_ids, spec.build()).perplexity
    if f"{full:.4g}" != f"{reduced:.4g}":
        (directory / WEIGHTS_FILE).write_bytes(original)
        return f"float32 (float16 changed the perplexity {full:.4f} -> {reduced:.4f})"
    return f"float16 (perplexity {full:.4f} with float32 weights, {reduced:.4f} with float16)"


def table_line(first_cells: list[str], row: dict) -> str:
    """One markdown table line: `first_cells`, then a row's (as in evaluation.json) measured ratio, held KiB and task scores."""
    cells = [*first_cells, f"{row['measured_ratio']:.2f}:1", f"{row['nbytes'] / 1024:.0f}"] + [f"{row['scores'][task]:.2f}" for task in TASKS]
    return "| " + " | ".join(cells) + " |"


def table_header(first_columns: list[str], settings: Settings) -> list[str]:
    header = [*first_columns, "measured compression", "held KiB", f"PPL@{settings.ppl_tokens}", f"pass key @{settings.short}", f"pass key @{settings.long}", f"multi-key @{settings.short}"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def card_section(rows: list[dict], settings: Settings, env: dict, name: str) -> str:
    """The card's comparison: `rows` are dense, this compressor, then the baselines (evaluation.json's rows)."""
    lines = table_header(["cache"], settings) + [
        table_line([f"**{row['cache']}** (this compressor)" if index == 1 else row["cache"]], row) for index, row in enumerate(rows)
    ]
    return "\n".join([
        "",
        "## Measured against dense, StreamingLLM and H2O at the same memory",
        "",
        f"{env['model']} in {env['dtype'].removeprefix('torch.')} on {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"kvcompress {env['kvcompress']}. All prompts come from the held-out last 20% of the {DEFAULT_CORPUS_NAME} text, which calibration never saw. "
        f"Scores are shares of answers found: {len(settings.short_depths) * settings.trials} pass-key prompts at {settings.short} tokens (depths "
        f"{', '.join(map(str, settings.short_depths))}), {len(settings.long_depths)} at {settings.long}, {settings.task_trials} multi-key prompts at "
        f"{settings.short}; the context is compressed before the question arrives. PPL is streaming perplexity on {settings.ppl_tokens} tokens. "
        f"Memory is the bytes the cache held at the end of a {settings.short}-token pass-key run; the baselines are given this compressor's measured ratio. "
        f"A gate is loaded as a user would, with ratio={RATIOS['gate']} and context= each prompt's length.",
        "",
        *lines,
        "",
        f"Reproduce from a clone of kvcompress: `python benchmarks/pretrained.py --only {name}`",
        "",
    ])


def docs_table() -> str:
    """Every shipped compressor beside dense and the baselines at its memory, from the evaluation.json files."""
    evaluations = {d.parent.name: json.loads(d.read_text()) for d in sorted(PRETRAINED_DIR.glob(f"*/{EVALUATION_FILE}"))}
    first = next(iter(evaluations.values()))
    settings, env = Settings(**first["settings"]), first["environment"]
    lines = table_header(["Hub id (`kvcompress/...`)", "cache"], settings) + [table_line(["-", "dense"], first["rows"][0])]
    for name, evaluation in evaluations.items():
        own, *baselines = evaluation["rows"][1:]
        options = " (" + ", ".join(f"{key}={value}" for key, value in evaluation["load_options"].items()) + ")" if evaluation["load_options"] else ""
        lines += [table_line([f"**{name}**", own["cache"].split()[0] + options], own), *(table_line(["", row["cache"]], row) for row in baselines)]
    return "\n".join([
        f"Measured by `python benchmarks/pretrained.py` ({env['model']} in {env['dtype'].removeprefix('torch.')}, {env['device']}, "
        f"transformers {env['transformers']}): every prompt comes from the held-out part of the shipped corpus; StreamingLLM and H2O "
        f"are given each compressor's measured ratio. Scores are shares of answers found ({len(settings.short_depths) * settings.trials} "
        f"pass-key prompts at {settings.short} tokens, {len(settings.long_depths)} at {settings.long}, {settings.task_trials} multi-key "
        f"prompts); the context is compressed before the question arrives. Memory is what the cache held after a {settings.short}-token prompt; "
        f"a gate is loaded with ratio={RATIOS['gate']} and context= each prompt's length ({settings.short} tokens for perplexity, "
        f"which streams {settings.ppl_tokens}).",
        "", *lines,
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME", help="repository folder names (default: all)")
    parser.add_argument("--device", default=None, help="torch device (default: CPU)")
    add_update_docs(parser, "pretrained.md", "pretrained")  # the table of all shipped compressors
    parser.add_argument("--render", action="store_true", help="measure nothing: only rebuild the docs table from the evaluation.json files")
    args = parser.parse_args(argv)
    if not args.render:
        measure(args)
    if args.update_docs:
        update_block(Path(args.update_docs), "pretrained", docs_table())
        print(f"updated {args.update_docs}")


def measure(args) -> None:
    model, tokenizer = kvcompress.load_model(device=args.device)
    settings = Settings()
    ppl_ids, tasks = prompts(tokenizer, heldout_text(), settings)
    tasks = {task: tasks[task] for task in TASKS if task in tasks}
    ppl_ids = ppl_ids.to(model.device)
    env = {"device": torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "transformers": transformers.__version__, "kvcompress": kvcompress.__version__,
           "model": model.config.name_or_path, "dtype": str(model.dtype)}
    directories = [d.parent for d in sorted(PRETRAINED_DIR.glob(f"*/{CONFIG_FILE}")) if args.only is None or d.parent.name in args.only]
    dense = run(model, tokenizer, [("dense", 1.0, CacheSpec("dense"))], ppl_ids, tasks, settings)[0]
    baselines: dict[float, list[Row]] = {}  # measured ratio (2 decimals) -> StreamingLLM and H2O rows
    for directory in directories:
        started = time.perf_counter()
        method = json.loads((directory / CONFIG_FILE).read_text())["method"]
        spec, load_options = CacheSpec.fitted(directory), {}
        precision = store_float16_if_unchanged(directory, spec, model, ppl_ids)
        print(f"{directory.name}: weights stored as {precision}")
        if method in RATIOS:
            spec = CacheSpec.fitted(f"{directory}@ratio={RATIOS[method]}")
            load_options = {"ratio": RATIOS[method], "context": settings.short}  # the card's perplexity (checked by the tests) streams with these
        own = run(model, tokenizer, [(method, None, spec)], ppl_ids, tasks, settings)[0]
        ratio = round(own.measured_ratio, 2)
        if ratio not in baselines:
            grid = [(name, ratio, CacheSpec(name, ratio)) for name in ("streamingllm", "h2o")]
            baselines[ratio] = run(model, tokenizer, grid, ppl_ids, tasks, settings)
        rows = [dense, own, *baselines[ratio]]
        repo_id = f"{PRETRAINED_NAMESPACE}/{directory.name}"
        evaluation = {
            "environment": env, "settings": asdict(settings), "weights": precision, "load_options": load_options,
            "dataset": f"{DEFAULT_CORPUS_NAME}, held-out part", "minutes": round((time.perf_counter() - started) / 60, 1),
            "row": {"compression_ratio": own.measured_ratio, "perplexity": own.scores["ppl"], "passkey_1536": own.scores["passkey"],
                    "passkey_6144": own.scores["passkey_long"], "multikey_1536": own.scores["multikey"], "held_bytes": own.nbytes},
            "rows": [asdict(row) | {"measured_ratio": row.measured_ratio} for row in rows],
        }
        evaluation["markdown"] = card_section(evaluation["rows"], settings, env, directory.name)
        (directory / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=1) + "\n")
        cache_arguments = "".join(f", {key}={value}" for key, value in load_options.items())
        CompressorArtifact.from_pretrained(directory).save_pretrained(
            directory, model_card_kwargs={"repo_id": repo_id, "evaluation": evaluation, "cache_arguments": cache_arguments},
        )
        print(evaluation["markdown"])
    print(f"wrote {', '.join(f'{d}/{EVALUATION_FILE}' for d in directories)} and their README.md model cards")


if __name__ == "__main__":
    main()

"""Calibration time and peak memory per method, on the device asked for.

    python benchmarks/calibration_cost.py --device cuda                                    # the default model, all four methods
    python benchmarks/calibration_cost.py --device cuda --llama-8b-shape --dtype bfloat16  # Llama-3.1-8B shape, random weights
    python benchmarks/calibration_cost.py --render docs/benchmark/calibration_*.json --update-docs

Each method runs as `kvcompress calibrate` in a process of its own (so that its peak memory is its own) with
the settings of the shipped compressors (pca and kvsplice at a 50% memory target, gate and sidecar at their
defaults, the sidecar at 32:4 windows). The table gives, per method, the calibration tokens it reads, the
calibration time (load, collection, fit: what `kvcompress calibrate` reports, the held-out check not included), the
time without the model's load per 1k calibration tokens, the peak memory (host resident set; GPU: torch's
allocator, all GPUs), and the held-out perplexity check (meaningless on random weights, which only give shapes and
memory). `--llama-8b-shape` builds a Llama-3.1-8B-shaped model (32 layers unless `--layers`) with random weights
and the default model's tokenizer; nothing is downloaded. The 8B/70B projection of the docs scales these numbers
with the model (see `projection`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from doc_block import add_update_docs, update_block
from gpu_throughput import LLAMA_8B

import kvcompress

BLOCK = "calibration-cost"
FISHER_TOKENS = 8 * 512  # --fisher-sequences 8 of 512 tokens, the default
METHODS = {  # method -> (extra options of the shipped recipe, calibration tokens it reads at the defaults)
    "pca": (["--target-memory-reduction", "0.5"], 16384 + FISHER_TOKENS),
    "kvsplice": (["--target-memory-reduction", "0.5"], 16384 + FISHER_TOKENS),
    "gate": ([], 20480),
    "sidecar": (["--slots", "4", "--disk-budget-gb", "40"], (24 + 4) * 1024),
}
LLAMA_70B_LAYERS, LLAMA_70B_LAYER_WORK = 80, 3.9  # 80 layers instead of 32, each with ~3.9x the weights of an 8B layer (hidden 8192, MLP 28672)
LLAMA_70B_WEIGHTS_GIB = 131.4  # 70.6e9 parameters in bfloat16


def random_llama_8b(directory: Path, layers: int, device: str, tokenizer: str | None) -> Path:
    """A Llama-3.1-8B-shaped model with `layers` layers, random bfloat16 weights and `tokenizer` (None: the default model's), saved in `directory`."""
    if (directory / "config.json").is_file():
        return directory
    config = transformers.LlamaConfig(**(LLAMA_8B | {"num_hidden_layers": layers}), dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer or kvcompress.models.default_model_path()).save_pretrained(directory)
    return directory


def load_once(model: str | None, device: str, dtype: str) -> tuple[float, str, float]:
    """(seconds to load the model, its dtype, GiB of its weights)."""
    started = time.perf_counter()
    loaded, _ = kvcompress.load_model(model, device=device, dtype=dtype)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    dtype, weights = str(loaded.dtype).removeprefix("torch."), sum(p.numel() * p.element_size() for p in loaded.parameters()) / 2**30
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the calibrations run in processes of their own
    return seconds, dtype, weights


def calibrate(method: str, model: str | None, device: str, dtype: str, workdir: Path) -> dict:
    """One `kvcompress calibrate` run in its own process; its calibration_results.json and the process's wall time."""
    options, tokens = METHODS[method]
    output = workdir / method
    command = [sys.executable, "-m", "kvcompress.calibration.cli", "calibrate", "--method", method, "--output", str(output), "--overwrite",
               "--device", device, "--dtype", dtype, *(["--model", model] if model else []), *options]
    if method == "sidecar":
        command += ["--trajectories", str(workdir / "trajectories")]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    results = json.loads((output / "calibration_results.json").read_text())
    return {"method": method, "calibration_tokens": tokens, "process_seconds": time.perf_counter() - started} | results


def table(data: dict) -> str:
    """A markdown table of one run (`data` as written to its JSON)."""
    load, random = data["load_seconds"], data.get("layers") is not None
    lines = [
        f"{data['model']} in {data['dtype']} ({data['weights_gib']:.1f} GiB of weights) on {data['device_name']}; loading it takes {load:.1f} s of each time below\n",
        "| method | calibration tokens | time (s) | s per 1k tokens, load excluded | peak host GiB | peak GPU GiB |" + ("" if random else " PPL dense / compressed |"),
        "|---|---|---|---|---|---|" + ("" if random else "---|"),
    ]
    for run in data["runs"]:
        gpu = run.get("peak_gpu_memory_bytes")
        per_1k = (run["calibration_seconds"] - load) / run["calibration_tokens"] * 1000
        lines.append(
            f"| {run['method']} | {run['calibration_tokens']} | {run['calibration_seconds']:.1f} | {per_1k:.2f} | {run['peak_host_memory_bytes'] / 2**30:.1f} "
            f"| {'-' if gpu is None else f'{gpu / 2**30:.1f}'} |" + ("" if random else f" {run['baseline_perplexity']:.2f} / {run['perplexity']:.2f} |")
        )
    return "\n".join(lines)


def projection(data: dict) -> str:
    """Llama-3.1-8B and Llama-3.1-70B estimates from a run on the 8B shape with `layers` layers. The time without the
    load and the GPU memory above the weights (activations, gradients, what a method keeps) grow with the layers and, for
    70B, with each layer's work; both estimates are upper bounds where a phase does not grow with the width (fitting
    per KV head: 70B has 8 KV heads of 128 dims per layer, as 8B has)."""
    to_8b = 32 / data["layers"]
    to_70b = LLAMA_70B_LAYERS / data["layers"] * LLAMA_70B_LAYER_WORK
    lines = [
        f"Projected from the run above ({data['layers']} of 32 layers): time and GPU memory above the weights x{to_8b:g} for 8B, "
        f"x{to_70b:.3g} for 70B (80 layers of ~{LLAMA_70B_LAYER_WORK}x the work); 70B's weights ({LLAMA_70B_WEIGHTS_GIB:.0f} GiB in bfloat16) "
        "need two H200s or more (`--device auto`).\n",
        "| method | 8B: minutes | 8B: peak GPU GiB | 70B: minutes | 70B: peak GPU GiB, all GPUs |",
        "|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        work = run["calibration_seconds"] - data["load_seconds"]
        working_set = run["peak_gpu_memory_bytes"] / 2**30 - data["weights_gib"]
        lines.append(
            f"| {run['method']} | {work * to_8b / 60:.1f} | {data['weights_gib'] * to_8b + working_set * to_8b:.0f} | {work * to_70b / 60:.1f} "
            f"| {LLAMA_70B_WEIGHTS_GIB + working_set * to_70b:.0f} |"
        )
    return "\n".join(lines)


def render(paths: list[str]) -> str:
    sections = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        sections.append(table(data) + ("\n\n" + projection(data) if data.get("layers") else ""))
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where every calibration runs (kvcompress calibrate --device)")
    parser.add_argument("--dtype", default="auto", help="kvcompress calibrate --dtype")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--llama-8b-shape", action="store_true", help="calibrate a Llama-3.1-8B-shaped model with random weights instead of the default model")
    parser.add_argument("--layers", type=int, default=32, help="with --llama-8b-shape: its layers (fewer, to fit a time limit; the docs project to 32)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="with --llama-8b-shape: the tokenizer to save with it; none: the default model's")
    parser.add_argument("--workdir", default="results/calibration-cost", help="artifacts, trajectories and the random model go here")
    parser.add_argument("--output", default=None, help="JSON to write (default: docs/benchmark/calibration_<model>_<device>.json)")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON", help="only print (and with --update-docs write) the tables of earlier runs")
    add_update_docs(parser, "calibration.md", BLOCK)
    args = parser.parse_args()
    if args.render:
        section = render(args.render)
    else:
        workdir = Path(args.workdir)
        model = str(random_llama_8b(workdir / f"llama-8b-shape-{args.layers}-layers", args.layers, args.device, args.tokenizer)) if args.llama_8b_shape else None
        name = f"Llama-3.1-8B shape, {args.layers} layers, random weights" if args.llama_8b_shape else kvcompress.models.DEFAULT_MODEL
        device_name = torch.cuda.get_device_name() if args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        load_seconds, dtype, weights_gib = load_once(model, args.device, args.dtype)
        data = {"model": name, "layers": args.layers if args.llama_8b_shape else None, "device": args.device, "device_name": device_name, "dtype": dtype,
                "weights_gib": weights_gib, "load_seconds": load_seconds, "torch": torch.__version__, "transformers": transformers.__version__, "runs": []}
        output = Path(args.output or f"docs/benchmark/calibration_{'llama-8b-shape' if args.llama_8b_shape else 'default'}_{args.device.split(':')[0]}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            data["runs"].append(calibrate(method, model, args.device, args.dtype, workdir))
            output.write_text(json.dumps(data, indent=2) + "\n")  # after every method: a run cut short keeps what it measured
        section = render([str(output)])
        print(f"wrote {output}")
    print("\n" + section)
    if args.update_docs:
        update_block(Path(args.update_docs), BLOCK, section)


if __name__ == "__main__":
    main()

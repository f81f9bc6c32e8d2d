"""NVIDIA kvpress presses on the benchmark's own prompts, in a virtual environment of their own.

kvpress 0.5.5 pins transformers < 5.3 and kvcompress needs >= 5.17, so this script imports only
torch, transformers and kvpress. It reads the prompts that `benchmarks/quality.py --export-prompts`
wrote, loads the same saved model weights (the converted default model:
``~/.cache/kvcompress/models/SmolLM2-135M-Instruct``), and runs each press through kvpress' own
API: inside ``with press(model):`` the context is pre-filled in one forward and compressed; the
question is then fed and the answer generated greedily, as kvcompress' evaluator does. Streaming
perplexity does not apply (a press compresses a prefill once, not a stream), so those rows have none.

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install "torch==2.13.0" "kvpress==0.5.5"
    .venv-kvpress/bin/python benchmarks/kvpress_runner.py --prompts prompts.json --model ~/.cache/kvcompress/models/SmolLM2-135M-Instruct \\
        --output docs/benchmark/kvpress.json [--ratios 8] [--presses StreamingLLMPress SnapKVPress ExpectedAttentionPress KnormPress]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.metadata import version

import kvpress
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "KnormPress")
TASKS = ("passkey", "passkey_long", "multikey", "variables")


@torch.no_grad()
def answer(model, tokenizer, press, context: str, question: str, max_new_tokens: int = 16) -> tuple[str, DynamicCache, int]:
    """(answer, cache, tokens seen). The question and answer are decoded greedily at their true positions, as kvpress'
    own pipeline does (`KVPressTextGenerationPipeline.generate_answer`): a pruned cache's length is no position."""
    context_ids = tokenizer(context, return_tensors="pt").input_ids.to(model.device)
    question_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    cache = DynamicCache()
    with press(model):
        model(input_ids=context_ids, past_key_values=cache, use_cache=True)
    position = context_ids.shape[1]
    positions = torch.arange(position, position + question_ids.shape[1], device=model.device)[None]
    token = model(input_ids=question_ids, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits[0, -1].argmax()
    position += question_ids.shape[1]
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    generated = [int(token)]
    while len(generated) < max_new_tokens and generated[-1] not in stop:
        positions = torch.tensor([[position]], device=model.device)
        token = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=positions).logits[0, -1].argmax()
        generated.append(int(token))
        position += 1
    return tokenizer.decode(generated, skip_special_tokens=True), cache, position


def held_and_dense_bytes(cache: DynamicCache, seen: int) -> tuple[int, int]:
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    first = cache.layers[0].keys
    dense = len(cache.layers) * 2 * first.shape[0] * first.shape[1] * seen * first.shape[-1] * first.element_size()
    return held, dense


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="default: the benchmark's")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    payload = json.loads(open(args.prompts).read())
    ratios = args.ratios or payload["ratios"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(args.device).eval()
    tasks = {name: payload["tasks"][name] for name in TASKS}
    rows = []
    progress = tqdm(total=len(ratios) * len(args.presses) * sum(map(len, tasks.values())), desc="kvpress", unit="prompt")
    for ratio in ratios:
        for name in args.presses:
            press = getattr(kvpress, name)(compression_ratio=1 - 1 / ratio)  # kvpress: the share of the context removed
            row = {"method": f"kvpress {name}", "cache": f"kvpress {name} {ratio:g}:1", "target": ratio, "scores": {}, "nbytes": 0, "dense_nbytes": 0}
            started = time.perf_counter()
            for task, prompts in tasks.items():
                results = []
                for prompt in prompts:
                    text, cache, seen = answer(model, tokenizer, press, prompt["context"], prompt["question"])
                    results.append(sum(expected in text for expected in prompt["answers"]) / len(prompt["answers"]))
                    if task == "passkey":
                        row["nbytes"], row["dense_nbytes"] = held_and_dense_bytes(cache, seen)
                        row["scores"].setdefault("passkey_by_depth", {}).setdefault(f"{prompt['depth']:g}", []).append(results[-1])
                    progress.update()
                row["scores"][task] = statistics.mean(results)
            row["scores"]["passkey_by_depth"] = {depth: statistics.mean(hits) for depth, hits in row["scores"]["passkey_by_depth"].items()}
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            tqdm.write(f"{row['cache']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["scores"].items() if isinstance(v, float)))
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    environment = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "kvpress": version("kvpress")}
    with open(args.output, "w") as file:
        json.dump({"environment": environment, "rows": rows}, file, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Decode throughput at equal KV memory on a GPU, peak memory, and the longest context that fits.

    python benchmarks/gpu_throughput.py [--context 32768] [--steps 32] [--longest dense streamingllm gates] \\
        [--output docs/benchmark] [--update-docs [docs/benchmarks.md]]

A Llama-3.1-8B-shaped model with random bf16 weights (nothing is downloaded). Caches are filled with
random post-RoPE keys/values through the cache API, chunk by chunk as a chunked prefill leaves them
(each compressed cache compresses as it goes), so that no 32k-token prefill is needed. Dense holds
`context` tokens at batch 8; every compressed cache sees `context` tokens per row and keeps about 1/8
of them at batch 64: the same KV memory. "ideal 8:1" is a `DynamicCache` holding context/8 tokens at
batch 64, the speed an 8:1 cache could reach at best. The learned caches run on artifacts of the
right shape with random weights (`synthetic_artifacts`): their speed does not depend on what the
weights learned, only on the shapes and the keep ratio, which is set for 8:1. The peer rows are transformers'
own `QuantizedCache` at int4 and int2 (quanto, or HQQ, when installed), each at the batch that holds dense's KV memory.

Per cache: tokens/s (median of `repeats` runs of `steps` greedy decode steps; fewer steps, at least 4, for caches so slow that a run would take over 5 s) and its ratio to dense, KV bytes held, and the
peak GPU memory while decoding. `--longest` finds, at batch 1, the longest context each named cache
can fill and decode in this GPU's memory (doubling, then bisection to within 1/16); `--longest-between`
resumes one cache's search from the bracket an earlier command left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # growing caches fragment the default allocator
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from doc_block import add_update_docs, update_block  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import kvcompress  # noqa: E402
from kvcompress.attention import SDPA_BACKENDS  # noqa: E402
from kvcompress.config import RankConfig  # noqa: E402
from kvcompress.evaluation.harness import QUANTIZED_CACHE_PACKAGES, cache_nbytes, quantized_cache_backend_installed  # noqa: E402
from kvcompress.gate import GateBank, GateCompressor  # noqa: E402
from kvcompress.hub import model_signature  # noqa: E402
from kvcompress.lowrank import KVSpliceCompressor, PCACompressor  # noqa: E402
from kvcompress.memory import kept_share  # noqa: E402
from kvcompress.rope import rope_inv_freq  # noqa: E402
from kvcompress.sidecar import SidecarCompressor, SidecarNetwork  # noqa: E402

LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)  # --tiny: checks the pipeline on a CPU
SINK, WINDOW = 4, 64
DENSE_BATCH, COMPRESSED_BATCH = 8, 64
PACKED = "packed GQA"  # rows whose name ends so run DynamicCache under `packed_gqa_sdpa`


def packed_gqa_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Decode attention with the query heads of each KV head packed as the rows of one query, so that each key is read
    once, as kvcompress's attention does; transformers' sdpa (enable_gqa) gives each query head its own pass.
    It shows how much of a cache's speed-up comes from that layout rather than from holding fewer tokens."""
    if query.shape[2] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, _, dim = query.shape
    with sdpa_kernel(SDPA_BACKENDS):
        output = F.scaled_dot_product_attention(query.view(batch, key.shape[1], -1, dim), key, value, scale=scaling)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register("packed_gqa_sdpa", packed_gqa_sdpa)
AttentionMaskInterface.register("packed_gqa_sdpa", sdpa_mask)


@dataclass
class Run:
    cache: str
    batch: int
    context: int
    tokens_per_second: float = 0.0
    vs_dense: float = 0.0  # against the dense run of the same invocation
    vs_packed_dense: float | None = None  # against dense under `packed_gqa_sdpa` in the same invocation (when it ran)
    kv_bytes: int = 0
    peak_bytes: int = 0
    error: str | None = None


def synthetic_artifacts(model, key_rank: int, composed_rank: int) -> dict:
    """Every fitted compressor for this model's shape, with random weights (gate thresholds fitted on random keys)."""
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    inv_freq = rope_inv_freq(model).cpu()
    base = model_signature(model, "random Llama-3.1-8B shape")
    generator = torch.Generator().manual_seed(0)

    bank = GateBank(layers, heads, dim)
    with torch.no_grad():
        probabilities = torch.sigmoid(bank(torch.randn(layers * heads, 2048, dim, generator=generator)))
    artifacts = {"gate": GateCompressor.from_gates(bank, probabilities, inv_freq, {"base_model": base, "cache": {"sink": SINK, "window": WINDOW, "block_size": 16}})}

    def lowrank(compressor_class, rank: int, orthonormal: bool):
        heads_ = []
        for _ in range(layers * heads):
            basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator)).Q  # [D, r]
            encoder = basis if orthonormal else basis * torch.rand(rank, generator=generator).add(0.5)
            heads_.append({"encoder": encoder, "encoder_bias": torch.zeros(rank), "decoder": torch.linalg.pinv(encoder), "decoder_bias": torch.zeros(dim)})
        ranks = RankConfig.uniform(layers, heads, dim, dim, rank, algo=compressor_class.method)
        config_ = {"base_model": base, "cache": {"sink": SINK, "window": WINDOW, "block_size": 16}, "ranks": ranks.to_json()}
        return compressor_class.from_heads(heads_, heads_, inv_freq, config_)

    artifacts["pca"] = lowrank(PCACompressor, key_rank, orthonormal=True)
    artifacts["kvsplice"] = lowrank(KVSpliceCompressor, key_rank, orthonormal=False)
    artifacts["pca-composed"] = lowrank(PCACompressor, composed_rank, orthonormal=True)
    network = SidecarNetwork(layers, heads, dim, window=32, slots=4)
    references = torch.randn(layers, heads, 64, dim, generator=generator)
    offsets = torch.exp(torch.empty(64).uniform_(math.log(32), math.log(1024), generator=generator)).round()
    artifacts["sidecar"] = SidecarCompressor.from_network(network, references, offsets, inv_freq, {"base_model": base, "cache": {"sink": SINK, "window": 32}})
    single = SidecarNetwork(layers, heads, dim, window=32, slots=1)  # keep-and-merge: one merged slot per window, the gates' tokens exact
    artifacts["keep-and-merge"] = SidecarCompressor.from_network(
        single, references, offsets, inv_freq, {"base_model": base, "cache": {"sink": SINK, "window": 32}}).with_gates(artifacts["gate"])
    return artifacts


def quantized_peers(context: int, config) -> dict:
    """transformers' own QuantizedCache (quanto or HQQ, whichever is installed) at int4 and int2, each at the batch that gives
    it dense's KV memory: a group of 64 numbers shares a bf16 scale and zero point, and its last 128 tokens stay exact."""
    backend = next(filter(quantized_cache_backend_installed, QUANTIZED_CACHE_PACKAGES), None)
    if backend is None:
        return {}
    return {
        f"QuantizedCache int{bits} ({backend}), batch {int(DENSE_BATCH * 16 / (bits + 0.5))}": (
            int(DENSE_BATCH * 16 / (bits + 0.5)), context, lambda bits=bits: QuantizedCache(backend=backend, config=config, nbits=bits))
        for bits in (4, 2)
    }


def caches(context: int, artifacts: dict, dim: int) -> dict:
    """name -> (batch, tokens seen per row, cache factory), every compressed cache set for about 8:1."""
    dense_bytes = 2 * dim * 2  # bf16 keys and values of one token and head
    exact = SINK + WINDOW + 16
    gate_keep = kept_share(8, context, exact, (dense_bytes + 8) / dense_bytes)  # + token id and gate score
    composed_width = 2 * artifacts["pca-composed"].ranks.d_k * artifacts["pca-composed"].ranks.memory_fraction()
    composed_keep = {bits: kept_share(8, context, exact, (composed_width * (bits / 8 + 2 / 32) + 8) / dense_bytes) for bits in (4, 8)}  # latents + fp16 scale per 32
    composed_rank = artifacts["pca-composed"].ranks.heads[0, 0].key
    big = (COMPRESSED_BATCH, context)
    return {
        f"dense, batch {DENSE_BATCH}": (DENSE_BATCH, context, DynamicCache),
        f"ideal 8:1 (dense, 1/8 of the tokens), batch {COMPRESSED_BATCH}": (COMPRESSED_BATCH, context // 8, DynamicCache),
        f"dense, batch {DENSE_BATCH}, {PACKED}": (DENSE_BATCH, context, DynamicCache),
        f"ideal 8:1, batch {COMPRESSED_BATCH}, {PACKED}": (COMPRESSED_BATCH, context // 8, DynamicCache),
        "streamingllm 8:1": (*big, lambda: kvcompress.StreamingLLMCache(ratio=8)),
        "streamingllm 8:1, block 64": (*big, lambda: kvcompress.StreamingLLMCache(ratio=8, block_size=64)),
        "h2o 8:1": (*big, lambda: kvcompress.H2OCache(ratio=8)),
        "h2o 8:1, block 64": (*big, lambda: kvcompress.H2OCache(ratio=8, block_size=64)),
        f"gates keep {gate_keep:.3f} (8:1)": (*big, lambda: kvcompress.GatedCache(artifacts["gate"], gate_keep, allocation="equal")),
        f"pca rank {artifacts['pca'].ranks.heads[0, 0].key} (8:1)": (*big, lambda: kvcompress.PCACache(artifacts["pca"])),
        f"kvsplice rank {artifacts['kvsplice'].ranks.heads[0, 0].key} (8:1)": (*big, lambda: kvcompress.KVSpliceCache(artifacts["kvsplice"])),
        "sidecar 32:4 (8:1)": (*big, lambda: kvcompress.SidecarCache(artifacts["sidecar"])),
        "attention matching 32:4 (8:1)": (*big, lambda: kvcompress.SidecarCache(artifacts["sidecar"], merge="attention_matching")),
        "keep-and-merge 32:1, ratio=8": (*big, lambda: kvcompress.SidecarCache(artifacts["keep-and-merge"], ratio=8, context=context)),
    } | {
        f"gates x pca rank {composed_rank} x int{bits}, keep {keep:.3f} (8:1)": (
            *big, lambda keep=keep, bits=bits: kvcompress.ComposedCache(artifacts["gate"], artifacts["pca-composed"], keep_ratio=keep, allocation="equal", bits=bits))
        for bits, keep in composed_keep.items()
    }


def fill(cache, model, batch: int, tokens: int, chunk: int = 4096):
    """Give every layer `tokens` random keys/values per row, in chunks, compressing as a chunked prefill would."""
    if isinstance(cache, kvcompress.SidecarCache):
        chunk = min(chunk, 512)  # the network's activations grow with the windows merged at once
    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    for layer_idx in range(config.num_hidden_layers):
        for start in range(0, tokens, chunk):
            size = min(chunk, tokens - start)
            keys = torch.randn(batch, config.num_key_value_heads, size, dim, device=model.device, dtype=model.dtype)
            if isinstance(cache, kvcompress.CompressedCache):
                layer = cache.layer(layer_idx)
                layer.update(keys, torch.randn_like(keys))
                layer.after_attention(None, None)
            else:
                cache.update(keys, torch.randn_like(keys), layer_idx)
    return cache


def kv_bytes(cache) -> int:
    return cache_nbytes(cache)[0]


@torch.no_grad()
def decode(model, cache, batch: int, steps: int, warmup: int = 3, repeats: int = 1) -> float:
    """Greedy decode steps on `cache`: the median over `repeats` of tokens per second over `steps` steps, after `warmup` steps."""
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    for _ in range(warmup):
        token = model(input_ids=token, **kvcompress.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    speeds = []
    for _ in range(repeats):
        synchronize(model.device)
        started = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, **kvcompress.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        synchronize(model.device)
        speeds.append(batch * steps / (time.perf_counter() - started))
    return statistics.median(speeds)


def profile(model, cache, batch: int, steps: int = 2) -> str:
    """The operations that took the most GPU time over `steps` decode steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        decode(model, cache, batch, steps, warmup=0)
    return trace.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(model, name: str, batch: int, tokens: int, factory, steps: int, repeats: int, profile_to: Path | None = None) -> Run:
    run = Run(name, batch, tokens)
    free_memory(model.device)
    model.set_attn_implementation("packed_gqa_sdpa" if name.endswith(PACKED) else "kvcompress_sdpa")
    try:
        cache = fill(factory(), model, batch, tokens)
        free_memory(model.device)
        estimate = decode(model, cache, batch, 2)  # slow caches get fewer steps, at least 4: each timed run about 5 s or `steps`
        run.tokens_per_second = decode(model, cache, batch, max(4, min(steps, int(5 * estimate / batch))), warmup=0, repeats=repeats)
        run.kv_bytes = kv_bytes(cache)
        run.peak_bytes = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else 0
        if profile_to is not None:
            with profile_to.open("a") as file:
                file.write(f"===== {name}\n{profile(model, cache, batch)}\n")
    except torch.OutOfMemoryError:
        run.error = "out of memory"
    return run


def fits(model, factory, tokens: int, chunk: int) -> bool:
    free_memory(model.device)
    model.set_attn_implementation("kvcompress_sdpa")
    started = time.perf_counter()
    try:
        decode(model, fill(factory(), model, 1, tokens, chunk=chunk), 1, steps=2, warmup=0)
        fitted = True
    except torch.OutOfMemoryError:
        fitted = False
    free_memory(model.device)
    print(f"  {tokens:,} tokens: {'fits' if fitted else 'out of memory'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return fitted


def longest_context(model, factory, start: int = 65536, limit: int = 2**25, bracket: tuple[int, int] | None = None) -> int:
    """The longest context (tokens, batch 1) that can be filled and decoded: doubling, then bisection to 1/16 (or a chunk).
    `bracket` (tokens that fit, tokens that do not), from an earlier search, skips the doubling: at millions of tokens
    a probe takes minutes, so a search may need several commands."""
    chunk = min(16384, start)
    low, high = bracket or (0, start)
    while not bracket and high <= limit and fits(model, factory, high, chunk):
        low, high = high, 2 * high
    if low == 0:
        return 0
    while high - low > max(low / 16, chunk):  # contexts are whole chunks: a bracket of one chunk is as close as it gets
        middle = (low + high) // 2 // chunk * chunk
        low, high = (middle, high) if fits(model, factory, middle, chunk) else (low, middle)
    return low


def table(runs: list[Run]) -> str:
    lines = ["| cache | batch | tokens/s | vs dense | vs dense, packed GQA | KV GiB held | peak GiB while decoding |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        if run.error:
            lines.append(f"| {run.cache} | {run.batch} | {run.error} | - | - | - | - |")
        else:
            packed = "-" if run.vs_packed_dense is None else f"{run.vs_packed_dense:.2f}x"
            lines.append(f"| {run.cache} | {run.batch} | {run.tokens_per_second:.0f} | {run.vs_dense:.2f}x | {packed} | {run.kv_bytes / 2**30:.1f} | {run.peak_bytes / 2**30:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of --steps steps per cache (the median is reported)")
    parser.add_argument("--profile", action="store_true", help="also write the top GPU operations of 2 decode steps per cache to OUTPUT/gpu_profile.txt")
    parser.add_argument("--only", nargs="*", default=None, metavar="PREFIX", help="run only the caches whose names start with these (dense always runs)")
    parser.add_argument("--longest", nargs="*", default=[], metavar="PREFIX", help="caches (name prefixes, 'dense' for DynamicCache) to find the longest context of")
    parser.add_argument(
        "--longest-between", nargs=2, type=int, default=None, metavar=("FITS", "DOES_NOT"),
        help="resume --longest (one cache) from an earlier search's bracket: FITS tokens fit, DOES_NOT do not",
    )
    parser.add_argument("--output", default="docs/benchmark")
    add_update_docs(parser, "benchmarks.md", "gpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (use --context 2048): checks the pipeline, measures nothing")
    parser.add_argument(
        "--render", nargs="+", default=None, metavar="JSON",
        help="only re-render the table and docs block from saved gpu.json files (several, e.g. --only and --longest parts, are merged; the header names each later part's rows)",
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = [json.loads(Path(path).read_text()) for path in args.render]
        unique, parts = {}, []
        for data in saved:
            rows = [run["cache"] for run in data["runs"] if run["cache"] not in unique]
            for run in data["runs"]:
                unique.setdefault(run["cache"], Run(**run))  # dense runs in every part: the first part's stays (another's rows keep their own ratios)
            if data is not saved[0] and (rows or data["longest_context"]):
                parts.append({"rows": rows, "longest": list(data["longest_context"]), "device": data["environment"]["device"], "minutes": data["environment"]["minutes"]})
        args.context, args.steps, args.repeats = saved[0]["context"], saved[0]["steps"], saved[0]["repeats"]
        env = saved[0]["environment"] | ({"parts": parts} if parts else {})
        return write_outputs(list(unique.values()), {name: tokens for data in saved for name, tokens in data["longest_context"].items()}, env, args, Path(args.output))
    if args.tiny and args.longest:
        parser.error("--longest searches up to running out of GPU memory; it cannot run with --tiny on the CPU.")
    if args.longest_between and (len(args.longest) != 1 or not 0 < args.longest_between[0] < args.longest_between[1]):
        parser.error("--longest-between FITS DOES_NOT resumes the search of one cache (--longest NAME), with 0 < FITS < DOES_NOT.")
    device = torch.device("cpu" if args.tiny else "cuda")
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_8B), attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = kvcompress.enable(LlamaForCausalLM(config).to(torch.bfloat16).eval())
    dim = config.hidden_size // config.num_attention_heads
    artifacts = synthetic_artifacts(model, key_rank=dim // 8 - 1, composed_rank=dim // 2)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "kvcompress": kvcompress.__version__}
    if device.type == "cuda":
        env |= {"device": torch.cuda.get_device_name(), "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    else:
        env |= {"device": "CPU (--tiny)", "memory_gib": 0}
    print(f"{env['device']} ({env['memory_gib']} GiB), torch {env['torch']}, transformers {env['transformers']}; "
          f"Llama-3.1-8B shape, random bf16 weights; context {args.context}\n", flush=True)
    started = time.perf_counter()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "gpu_profile.txt").unlink(missing_ok=True)
    cases = caches(args.context, artifacts, dim) | quantized_peers(args.context, config)
    so_far = lambda: env | {"minutes": round((time.perf_counter() - started) / 60, 1)}  # noqa: E731
    runs = []
    for index, (name, (batch, tokens, factory)) in enumerate(cases.items()):
        if index > 0 and args.only is not None and not name.startswith(tuple(args.only)):
            continue
        profile_to = Path(args.output) / "gpu_profile.txt" if args.profile else None
        runs.append(measure(model, name, batch, tokens, factory, args.steps, args.repeats, profile_to))
        runs[-1].vs_dense = runs[-1].tokens_per_second / runs[0].tokens_per_second if not runs[0].error else 0.0  # dense may not fit a long --context
        packed_dense = next((run for run in runs if run.cache == f"dense, batch {DENSE_BATCH}, {PACKED}" and not run.error), None)
        if packed_dense is not None:
            runs[-1].vs_packed_dense = runs[-1].tokens_per_second / packed_dense.tokens_per_second
        write_outputs(runs, {}, so_far(), args, Path(args.output), quiet=True)  # partial results survive a crash
        print(table(runs).splitlines()[-1], flush=True)
    longest = {}
    factories = {"dense": DynamicCache} | {name: factory for name, (_, _, factory) in cases.items()}
    for prefix in args.longest:
        name = next(name for name in factories if name.startswith(prefix))
        longest[name] = longest_context(model, factories[name], start=args.context * 2, bracket=args.longest_between)
        print(f"longest context at batch 1, {name}: {longest[name]} tokens", flush=True)
        write_outputs(runs, longest, so_far(), args, Path(args.output), quiet=True)
    write_outputs(runs, longest, so_far(), args, Path(args.output))


def write_outputs(runs: list[Run], longest: dict, env: dict, args, output: Path, quiet: bool = False) -> None:
    output.mkdir(parents=True, exist_ok=True)
    saved = {"environment": env, "context": args.context, "steps": args.steps, "repeats": args.repeats, "runs": [asdict(r) for r in runs], "longest_context": longest}
    (output / "gpu.json").write_text(json.dumps(saved, indent=1))
    separate = "".join(
        f"; {', '.join(part['rows'] + [f'the longest context of {name}' for name in part['longest']])}: a separate command ({part['device']}, {part['minutes']} min"
        f"{'; their ratios are to the dense rows of that command' if part['rows'] else ''})" for part in env.get("parts", [])
    )
    lines = [
        f"Generated by `python benchmarks/gpu_throughput.py` ({env['device']}, {env['memory_gib']} GiB, torch {env['torch']}, transformers {env['transformers']}; "
        f"{env['minutes']} min{separate}). Llama-3.1-8B shape with random bf16 weights; dense holds {args.context} tokens at batch {DENSE_BATCH}, each compressed cache "
        f"sees {args.context} tokens per row and keeps about 1/8 of them at batch {COMPRESSED_BATCH} (the same KV memory); median tokens/s of {args.repeats} runs of {args.steps} greedy decode steps.",
        "", table(runs),
    ]
    if longest:
        lines += ["", "Longest context that fills and decodes at batch 1 (within 1/16):", "", "| cache | tokens |", "|---|---|"]
        lines += [f"| {name} | {tokens:,} |" for name, tokens in longest.items()]
    section = "\n".join(lines)
    (output / "gpu.md").write_text(section + "\n")
    if quiet:
        return
    print("\n" + section)
    if args.update_docs:
        update_block(Path(args.update_docs), "gpu", section)


if __name__ == "__main__":
    main()

"""Decode throughput at equal KV memory on a GPU: dense at batch 8 vs 8:1 caches at batch 64.

    python benchmarks/gpu_throughput.py [--context 32768] [--steps 32]

A Llama-3.1-8B-shaped model with random bf16 weights (nothing is downloaded). Caches are filled
with random post-RoPE keys/values through the cache API, as a prefill would leave them, so that
no 32k-token prefill is needed: dense holds `context` tokens at batch 8; each compressed cache sees
`context` tokens per row and keeps 1/8 of them at batch 64, the same KV memory. "ideal 8:1" is a
`DynamicCache` holding context/8 tokens at batch 64: the speed an 8:1 cache could reach at best.
Prints tokens/s, the ratio to dense, KV bytes held and peak GPU memory.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcompress

LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
)


def fill(cache, config, batch: int, tokens: int, chunk: int = 4096):
    """Give every layer `tokens` random keys/values per row, in chunks, compressing as a prefill would."""
    head_dim = config.hidden_size // config.num_attention_heads
    for layer_idx in range(config.num_hidden_layers):
        for start in range(0, tokens, chunk):
            size = min(chunk, tokens - start)
            k = torch.randn(batch, config.num_key_value_heads, size, head_dim, device="cuda", dtype=torch.bfloat16)
            if isinstance(cache, kvcompress.CompressedCache):
                layer = cache.layer(layer_idx)
                layer.update(k, torch.randn_like(k))
                layer.after_attention(None, None)
            else:
                cache.update(k, torch.randn_like(k), layer_idx)
    return cache


def kv_bytes(cache) -> int:
    if isinstance(cache, kvcompress.CompressedCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers)


@torch.no_grad()
def tokens_per_second(model, cache, batch: int, steps: int) -> float:
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    for _ in range(3):  # warm-up
        token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    config = LlamaConfig(**LLAMA_8B, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = kvcompress.enable(LlamaForCausalLM(config).to(torch.bfloat16).eval())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Llama-3.1-8B shape, random bf16 weights; context {args.context}\n")
    runs = {
        "dense, batch 8": (8, args.context, DynamicCache),
        "ideal 8:1 (dense, 1/8 of the tokens), batch 64": (64, args.context // 8, DynamicCache),
        "streamingllm 8:1, batch 64": (64, args.context, lambda: kvcompress.StreamingLLMCache(ratio=8)),
        "streamingllm 8:1 block 64, batch 64": (64, args.context, lambda: kvcompress.StreamingLLMCache(ratio=8, block_size=64)),
        "h2o 8:1, batch 64": (64, args.context, lambda: kvcompress.H2OCache(ratio=8)),
        "h2o 8:1 block 64, batch 64": (64, args.context, lambda: kvcompress.H2OCache(ratio=8, block_size=64)),
    }
    print("| cache | tokens/s | vs dense | KV GiB held | peak GiB |")
    print("|---|---|---|---|---|")
    dense = None
    for name, (batch, tokens, factory) in runs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = fill(factory(), config, batch, tokens)
        speed = tokens_per_second(model, cache, batch, args.steps)
        dense = dense or speed
        print(f"| {name} | {speed:.0f} | {speed / dense:.2f}x | {kv_bytes(cache) / 2**30:.1f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |", flush=True)
        del cache


if __name__ == "__main__":
    main()

"""Run by `test_tensor_parallel.py` under torchrun: generate with a tensor-parallel model (tp_plan="auto") and print, per
cache, whether it generated dense's tokens. Each rank's cache holds that rank's KV heads only."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

import kvcompress
from kvcompress import H2OCache, StreamingLLMCache, cache_kwargs

CACHES = {
    "streamingllm budget 10000": lambda: StreamingLLMCache(budget=10000),
    "h2o budget 10000": lambda: H2OCache(budget=10000),
    "h2o ratio 1": lambda: H2OCache(ratio=1),
    "h2o budget 10000, blocks of 8": lambda: H2OCache(budget=10000, block_size=8),
}


def main(path: str, length: int) -> None:
    model = kvcompress.enable(AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="sdpa").eval())
    ids = torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0  # the second row left-padded

    def generate(cache):
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        return out[:, length:].tolist()

    dense = generate(DynamicCache())
    results = {}
    for name, make in CACHES.items():
        cache = make()
        results[name] = generate(cache) == dense
    if dist.get_rank() == 0:
        print("RESULTS " + json.dumps({"kv heads per rank": cache.layers[0].tail["keys"].shape[1], "equal dense": results}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

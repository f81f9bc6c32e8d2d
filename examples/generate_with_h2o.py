"""Generate with a compressed KV cache: H2O holding at most 64 tokens per layer and head, on the default model.

    python examples/generate_with_h2o.py
"""

import torch

import kvcompress

model, tokenizer = kvcompress.load_model()  # for your own model: kvcompress.enable(model)
messages = [{"role": "user", "content": "Explain in three sentences why the KV cache grows during generation."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

# A token budget bounds memory however long the generation runs; a ratio (H2OCache(ratio=4)) suits long prompts,
# but on a 43-token chat prompt it would leave about 10 tokens and lose the question.
cache = kvcompress.H2OCache(budget=64)
with torch.no_grad():
    output = model.generate(**inputs, cache=cache, max_new_tokens=96, do_sample=False)  # transformers < 5.24: past_key_values=cache

print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(f"KV cache: {cache.nbytes() / 1024:.0f} KiB held, {cache.dense_nbytes() / 1024:.0f} KiB dense ({cache.compression_ratio:.2f}:1)")

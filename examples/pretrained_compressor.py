"""A question about a long document, answered with the dense cache and through a pretrained compressor.

    python examples/pretrained_compressor.py [HUB_ID_OR_DIR, default kvcompress/smollm2-135m-instruct-sidecar-8x]

The compressor is downloaded from the Hub by its id, or, where the Hub has no answer, taken from the
copy that ships with kvcompress. Any id `kvcompress pretrained` lists works here, and any directory
`kvcompress calibrate` wrote for this model. Both answers are printed: a compressed cache can lose a
fact that the dense one keeps (see the README's table).
"""

import sys
from pathlib import Path

import torch
from transformers import DynamicCache

import kvcompress

repo_id = sys.argv[1] if len(sys.argv) > 1 else "kvcompress/smollm2-135m-instruct-sidecar-8x"
cache = kvcompress.load_cache(repo_id)  # the cache class the artifact was fitted for: GatedCache, PCACache, ...

model, tokenizer = kvcompress.load_model()
prose = (Path(kvcompress.__file__).parent / "data" / "wikitext-2" / "valid.txt").read_text()[-60000:]
document = " ".join(prose.split()[:900]) + "\n\nThe museum's new director is Ada Okafor.\n\n" + " ".join(prose.split()[900:1200])
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": document + "\n\nWho is the museum's new director? Answer with the name."}], tokenize=False, add_generation_prompt=True,
)
inputs = tokenizer(prompt, return_tensors="pt")
for name, past in (("dense", DynamicCache()), (repo_id, cache)):
    with torch.no_grad():
        output = model.generate(**inputs, **kvcompress.cache_kwargs(past), max_new_tokens=16, do_sample=False)  # cache=past on transformers >= 5.24
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")
    print(f"{name}: {answer}")

print(f"{inputs.input_ids.shape[1]} prompt tokens; the compressed cache held {cache.nbytes() / 1024:.0f} KiB of {cache.dense_nbytes() / 1024:.0f} KiB dense ({cache.compression_ratio:.2f}:1)")

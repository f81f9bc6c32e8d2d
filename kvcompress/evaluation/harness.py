"""An honest evaluator: streaming perplexity, passkey retrieval by depth, and the memory held.

* Streaming perplexity feeds the text in chunks: every token is predicted from the compressed past
  plus the exact tokens of its own chunk. The first chunk's tokens are not scored (they would be
  predicted from an uncompressed prefix); a dense cache gives exactly the perplexity of one plain
  forward pass over the same scored tokens.
* Passkey retrieval hides a five-digit key at a relative depth of a haystack of real prose. The
  haystack is fed first and compressed before the question arrives (the cache cannot know the
  question); the question is then fed and the answer generated greedily. A trial counts only if the
  generated text contains the exact key.
* Memory is what the cache holds at the end of the longest run, against a `DynamicCache`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvcompress import H2OCache, StreamingLLMCache, cache_kwargs
from kvcompress.cache import CompressedCache
from kvcompress.composed import ComposedCache
from kvcompress.hub import CompressorArtifact, load_cache
from kvcompress.models import check_token_ids

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
COMPOSE = "compose"  # CacheSpec.fitted("compose@gate=DIR,lowrank=DIR,...") builds a ComposedCache
CACHE_CLASSES = {"dense": DynamicCache, "streamingllm": StreamingLLMCache, "h2o": H2OCache}
PASSKEY_INTRO = (
    "Below is a long text. Somewhere in it is a five-digit pass key. "
    "Remember it, you will be asked for it at the end.\n\n"
)
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nNow answer: what is the five-digit pass key mentioned in the text above? The pass key is"


def _cache_class(method: str):
    if method not in CACHE_CLASSES:
        raise ValueError(f"Unknown cache '{method}'; choose from {', '.join(CACHE_CLASSES)}.")
    return CACHE_CLASSES[method]


def build_cache(method: str, ratio: float | None = None, budget: int | None = None):
    """A fresh cache by name: 'dense', or a compressed method with its ratio or token budget."""
    cache_class = _cache_class(method)
    return cache_class() if method == "dense" else cache_class(budget=budget, ratio=ratio)


@dataclass(frozen=True)
class CacheSpec:
    """A cache to evaluate: a method name from `CACHE_CLASSES` and its compression ratio, or a fitted compressor's directory."""

    method: str
    ratio: float | None = None
    path: str | None = None
    options: tuple = ()  # (name, value) pairs for a fitted cache, e.g. (("keep_ratio", 0.08), ("policy", "layer"))

    def __post_init__(self):
        if self.path is not None:
            return
        _cache_class(self.method)
        if self.method != "dense" and self.ratio is None:
            raise ValueError(f"Cache '{self.method}' needs a compression ratio.")

    @classmethod
    def fitted(cls, spec: str | Path) -> CacheSpec:
        """A saved compressor (a directory or Hub id): ``DIR`` or ``DIR@name=value,...`` (options of its cache's from_pretrained, e.g. keep_ratio=0.08,policy=layer),
        or a composition ``compose@gate=DIR,lowrank=DIR,keep_ratio=0.1,bits=4`` (`ComposedCache.from_pretrained`'s options)."""
        path, _, option_text = str(spec).partition("@")
        if path == COMPOSE:
            return cls(COMPOSE, path=COMPOSE, options=_parse_options(option_text, spec))
        method = CompressorArtifact.from_pretrained(path).method  # a directory or a Hub id (the shipped ones work offline)
        return cls(method, path=path, options=_parse_options(option_text, spec))

    def build(self, context: int | None = None):
        """A fresh cache. `context`: the tokens it will see, where ``ratio=`` is met by a fitted cache whose spec gives no
        ``context=`` of its own (its keep ratio or window depends on the length; the baselines' budget follows it anyway)."""
        options = dict(self.options)
        if context is not None and "ratio" in options:
            options.setdefault("context", context)
        if self.method == COMPOSE:
            return ComposedCache.from_pretrained(**options)
        if self.path is not None:
            return load_cache(self.path, **options)
        return build_cache(self.method, self.ratio)

    @property
    def label(self) -> str:
        if self.method == COMPOSE:
            return " ".join([COMPOSE] + [f"{name}={Path(value).name if name in ('gate', 'lowrank') else value}" for name, value in self.options])
        if self.path is not None:
            return " ".join([self.method, Path(self.path).name] + [f"{name}={value}" for name, value in self.options])
        return self.method if self.ratio is None else f"{self.method} {self.ratio:g}:1"


def _parse_options(text: str, spec) -> tuple:
    """``name=value,...`` -> ((name, value), ...), numbers parsed."""
    options = []
    for item in filter(None, text.split(",")):
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"Compressor option {item!r} in {spec!r} must look like name=value.")
        options.append((name, _parse_value(value)))
    return tuple(options)


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cache_nbytes(cache) -> tuple[int, int]:
    """(bytes held, bytes a dense cache would hold) for a compressed cache, a `DynamicCache`, or transformers' `QuantizedCache`
    (its quantized states, quanto's or HQQ's, counted by what they store: packed integers, scales and shifts)."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes(), cache.dense_nbytes()
    held = dense = 0
    for layer in cache.layers:
        exact = [t for t in (layer.keys, layer.values) if t is not None and t.dim() == 4]
        quantized = [q for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)) if q is not None]
        held += sum(_stored_bytes(t) for t in (*exact, *quantized))
        if quantized:  # every token the layer saw, at the dtype it computes in (HQQ's states are (integers, metadata))
            quantized_keys = quantized[0]
            (batch, heads, _, dim), dtype = (quantized_keys[1]["shape"], quantized_keys[1]["compute_dtype"]) if isinstance(quantized_keys, tuple) else (quantized_keys.shape, quantized_keys.dtype)
            dense += 2 * batch * heads * layer.get_seq_length() * dim * torch.finfo(dtype).bits // 8
        else:
            dense += sum(_stored_bytes(t) for t in exact)
    return held, dense


QUANTIZED_CACHE_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}  # backend -> (module, pip package)


def quantized_cache_backend_installed(backend: str) -> bool:
    """Whether transformers' `QuantizedCache` can run with `backend` here (its package is importable)."""
    try:
        return importlib.util.find_spec(QUANTIZED_CACHE_PACKAGES[backend][0]) is not None
    except ModuleNotFoundError:  # "optimum" itself is not installed
        return False


def _stored_bytes(value) -> int:
    """Bytes of the tensors in `value`: a tensor, a tensor subclass (its inner tensors), or a tuple / dict of them."""
    if isinstance(value, (tuple, list)):
        return sum(_stored_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_stored_bytes(item) for item in value.values())
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_stored_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


@dataclass
class PerplexityResult:
    perplexity: float
    scored_tokens: int
    nbytes: int
    dense_nbytes: int


@torch.no_grad()
def streaming_perplexity(model, input_ids: torch.Tensor, cache, chunk_size: int = 32) -> PerplexityResult:
    """Perplexity of tokens `chunk_size..T-1` of `input_ids` ([1, T]), fed chunk by chunk through `cache`."""
    total = input_ids.shape[1]
    if total <= chunk_size:
        raise ValueError(f"Need more than one chunk of text: {total} tokens with chunk_size={chunk_size}.")
    nll, scored = 0.0, 0
    for start in range(0, total - 1, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        logits = model(input_ids=chunk, **cache_kwargs(cache), use_cache=True).logits[0]
        first = max(chunk_size, start + 1)  # first target token scored from this chunk
        targets = input_ids[0, first : start + chunk.shape[1] + 1]
        if len(targets):
            predicted = logits[first - 1 - start : first - 1 - start + len(targets)]
            nll += float(torch.nn.functional.cross_entropy(predicted.float(), targets.to(predicted.device), reduction="sum"))
            scored += len(targets)
    held, dense = cache_nbytes(cache)
    return PerplexityResult(math.exp(nll / scored), scored, held, dense)


@torch.no_grad()
def attention_outputs(model, input_ids: torch.Tensor, cache, chunk_size: int = 32, last_tokens: int = 64) -> list[torch.Tensor]:
    """Every layer's attention output (after its output projection) for the last `last_tokens` tokens of
    `input_ids` ([1, T]), the earlier ones fed chunk by chunk through `cache`."""
    recorded, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda module, args, output: recorded.append(output[0][0].float())))
    try:
        history = input_ids.shape[1] - last_tokens
        for start in range(0, history, chunk_size):
            model(input_ids=input_ids[:, start : min(start + chunk_size, history)], **cache_kwargs(cache), use_cache=True)
        recorded.clear()
        model(input_ids=input_ids[:, history:], **cache_kwargs(cache), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return list(recorded)


def attention_cosine(outputs: list[torch.Tensor], dense_outputs: list[torch.Tensor]) -> float:
    """Mean cosine similarity, over layers and tokens, of attention outputs against the dense cache's (seed 002)."""
    return float(torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(outputs, dense_outputs)]).mean())


@torch.no_grad()
def reference_perplexity(model, input_ids: torch.Tensor, first_scored: int) -> float:
    """Perplexity of tokens `first_scored..T-1` from one plain forward pass (the check on the streaming one)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[0]
    targets = input_ids[0, first_scored:]
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[first_scored - 1 : -1].float(), targets)))


def passkey_context(tokenizer, haystack_ids: list[int], context_tokens: int, depth: float, key: int, offset: int = 0) -> tuple[str, str]:
    """(context with the key hidden at `depth`, question) of about `context_tokens` tokens in all."""
    needle = PASSKEY_NEEDLE.format(key=key)
    fixed = len(tokenizer(PASSKEY_INTRO + needle + PASSKEY_QUESTION).input_ids)
    room = context_tokens - fixed
    if room <= 0 or offset + room > len(haystack_ids):
        raise ValueError(f"Cannot build a {context_tokens}-token passkey prompt from {len(haystack_ids)} haystack tokens at offset {offset}.")
    hay = haystack_ids[offset : offset + room]
    cut = int(len(hay) * depth)
    return PASSKEY_INTRO + tokenizer.decode(hay[:cut]) + needle + tokenizer.decode(hay[cut:]), PASSKEY_QUESTION


@torch.no_grad()
def answer(model, tokenizer, cache, context: str, question: str, max_new_tokens: int = 8, prefill_chunk_size: int | None = None) -> str:
    """Feed the context (compressing it), then the question; the greedy answer's text."""
    context_ids = tokenizer(context, return_tensors="pt").input_ids.to(model.device)
    question_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    step = prefill_chunk_size or context_ids.shape[1]
    for start in range(0, context_ids.shape[1], step):
        model(input_ids=context_ids[:, start : start + step], **cache_kwargs(cache), use_cache=True)
    full = torch.cat([context_ids, question_ids], dim=1)
    out = model.generate(
        input_ids=full, attention_mask=torch.ones_like(full), **cache_kwargs(cache), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True)


def passkey_trial(model, tokenizer, cache, context: str, question: str, key: int, max_new_tokens: int = 8, prefill_chunk_size: int | None = None) -> bool:
    """True if the greedy answer to the question after the context contains the key."""
    return str(key) in answer(model, tokenizer, cache, context, question, max_new_tokens, prefill_chunk_size)


@dataclass
class EvaluationRow:
    cache: str
    perplexity: float | None = None
    passkey: dict = field(default_factory=dict)
    nbytes: int = 0
    dense_nbytes: int = 0
    seconds: float = 0.0
    attention_cosine: float | None = None  # mean over layers and the last 64 perplexity tokens, vs dense (seed 002)

    @property
    def measured_ratio(self) -> float:
        return self.dense_nbytes / self.nbytes if self.nbytes else float("nan")


def check_specs(specs: list[CacheSpec], passkey_tokens: int) -> None:
    """Build every cache once: a mistyped option or an impossible ratio fails before any cache runs (or the model loads)."""
    wrong = [spec for spec in specs if not isinstance(spec, CacheSpec)]
    if wrong:
        raise TypeError(f"evaluate takes CacheSpec objects (e.g. CacheSpec('h2o', 8), CacheSpec.fitted('DIR@ratio=8')), got {wrong[0]!r}.")
    for spec in specs:
        try:
            spec.build(passkey_tokens)
        except ValueError as error:
            raise ValueError(
                f"{spec.label} cannot be built for the {passkey_tokens}-token pass-key prompts: {error} Change its options, or the prompts' length "
                "(passkey_tokens). On the command line the options follow the compressor (e.g. DIR@ratio=8,window=16) and --passkey-tokens sets the length."
            ) from error


def evaluate(
    model,
    tokenizer,
    specs: list[CacheSpec],
    text: str,
    ppl_tokens: int = 1024,
    ppl_chunk: int = 32,
    passkey_tokens: int = 1536,
    depths=DEPTHS,
    trials: int = 2,
    seed: int = 0,
) -> list[EvaluationRow]:
    """Evaluate every cache on the same text and the same passkey prompts."""
    check_specs(specs, passkey_tokens)
    ids = tokenizer(text).input_ids
    if len(ids) < ppl_tokens + passkey_tokens * trials:
        raise ValueError(
            f"The evaluation text has {len(ids)} tokens; the perplexity text and the pass-key prompts need {ppl_tokens + passkey_tokens * trials} "
            f"({ppl_tokens} + {trials} trials x {passkey_tokens}). Give a longer text, or fewer ppl_tokens, passkey_tokens or trials "
            "(on the command line: --data, --ppl-tokens, --passkey-tokens, --trials)."
        )
    check_token_ids(model, tokenizer, ids)
    ppl_ids = torch.tensor([ids[:ppl_tokens]], device=model.device)
    haystack = ids[ppl_tokens:]
    rng = random.Random(seed)
    prompts = [
        (depth, key, *passkey_context(tokenizer, haystack, passkey_tokens, depth, key, offset=trial * passkey_tokens))
        for trial in range(trials)
        for depth in depths
        for key in [rng.randint(10000, 99999)]
    ]
    rows = []
    dense_outputs = attention_outputs(model, ppl_ids, DynamicCache(), ppl_chunk) if ppl_tokens else None
    progress = tqdm(total=len(specs) * (1 + len(prompts)), desc="evaluate", unit="run")
    for spec in specs:
        row, started = EvaluationRow(spec.label), time.perf_counter()
        if ppl_tokens:
            progress.set_postfix_str(f"{spec.label}: perplexity")
            row.perplexity = streaming_perplexity(model, ppl_ids, spec.build(passkey_tokens), ppl_chunk).perplexity  # the pass-key setting: the table's
            row.attention_cosine = attention_cosine(attention_outputs(model, ppl_ids, spec.build(passkey_tokens), ppl_chunk), dense_outputs)
            progress.update()
        hits = {depth: [] for depth in depths}
        for depth, key, context, question in prompts:
            progress.set_postfix_str(f"{spec.label}: passkey depth {depth}")
            cache = spec.build(passkey_tokens)
            hits[depth].append(passkey_trial(model, tokenizer, cache, context, question, key))
            row.nbytes, row.dense_nbytes = cache_nbytes(cache)
            progress.update()
        row.passkey = {depth: sum(h) / len(h) for depth, h in hits.items() if h}
        row.seconds = time.perf_counter() - started
        rows.append(row)
    progress.close()
    return rows


def format_table(rows: list[EvaluationRow], ppl_tokens: int, passkey_tokens: int) -> str:
    """A markdown table: cache, measured ratio, memory, perplexity (and change vs dense), passkey by depth."""
    depths = sorted({d for row in rows for d in row.passkey})
    dense_ppl = next((row.perplexity for row in rows if row.cache == "dense"), None)
    header = ["cache", "measured ratio", "held KiB", "dense KiB", f"PPL@{ppl_tokens}", "ΔPPL", "attn cos"]
    header += [f"pk {d:g}" for d in depths] + [f"passkey@{passkey_tokens}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        delta = f"{100 * (row.perplexity / dense_ppl - 1):+.1f}%" if dense_ppl and row.perplexity else "-"
        mean = sum(row.passkey.values()) / len(row.passkey) if row.passkey else float("nan")
        cells = [
            row.cache, f"{row.measured_ratio:.2f}", f"{row.nbytes / 1024:.0f}", f"{row.dense_nbytes / 1024:.0f}",
            "-" if row.perplexity is None else f"{row.perplexity:.3f}", delta,
            "-" if row.attention_cosine is None else f"{row.attention_cosine:.4f}",
        ]
        cells += [f"{row.passkey.get(d, float('nan')):.2f}" for d in depths] + [f"{mean:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_json(rows: list[EvaluationRow], **about) -> str:
    """The rows as JSON, with what produced them (`about`: model, data, settings, command) and the versions that ran: numbers
    without their setting cannot be compared with a later run."""
    import transformers

    from kvcompress import __version__

    versions = {"kvcompress": __version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return json.dumps(about | {"versions": versions, "rows": [asdict(row) | {"measured_ratio": row.measured_ratio} for row in rows]}, indent=2) + "\n"

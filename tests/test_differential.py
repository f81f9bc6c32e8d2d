"""Differential property tests: every kvcompress cache against transformers' `DynamicCache`, on random tiny models.

Hypothesis draws the model (architecture, KV heads, GQA ratio 1/2/4, head_dim, layers), a cache with its settings,
and the inputs (a left-padded batch of 2-3 rows, chunked prefill, a second chat turn on the same cache), and checks
what the library promises: lossless settings generate what `DynamicCache` generates; a left-padded batch generates,
row for row, what each row generates alone (but for ties within float rounding); `nbytes()` counts every storage the
layers hold; token budgets hold after every forward; and bad settings are refused with a ValueError or TypeError that
names them, never anything else.

KVCOMPRESS_PROPERTY_EXAMPLES sets the examples per test. Unset (CI), each test runs 100 derandomized examples: the
same ones on every run, so CI does not flake and a failure reproduces. Set, every run draws fresh random examples
(a local search, e.g. ``KVCOMPRESS_PROPERTY_EXAMPLES=200 pytest tests/test_differential.py``), and hypothesis'
database replays the failures it found first.

The learned artifacts are fitted on each drawn model with the helpers of test_gates and test_lowrank; the sidecar is
an untrained network whose output layer is randomised (so its merge is not attention matching's). Their quality is
not under test, only that the caches keep the promises above.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, greedy, prompt_ids, tiny_model
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from packaging.version import Version
from test_gates import tiny_gates
from test_lowrank import SETTINGS, calibrate, uniform
from transformers import DynamicCache

from kvcompress import ComposedCache, GatedCache, H2OCache, KVSpliceCache, PCACache, SidecarCache, SidecarCompressor, StreamingLLMCache
from kvcompress.calibration.sidecar import reference_queries
from kvcompress.calibration.trajectories import collect_trajectories
from kvcompress.gate import ALLOCATIONS, POLICIES
from kvcompress.hub import model_signature
from kvcompress.rope import rope_inv_freq
from kvcompress.sidecar import MERGES, MODES, SidecarNetwork

EXAMPLES = os.environ.get("KVCOMPRESS_PROPERTY_EXAMPLES")
PROFILE = settings(
    max_examples=int(EXAMPLES or 100), deadline=None, derandomize=EXAMPLES is None, print_blob=True,
    # CI reports a failing example as drawn (shrinking takes minutes of model runs); the local search shrinks it, without
    # the explain phase (it reruns a failing example hundreds of times).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink] if EXAMPLES else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CACHES = {
    "streamingllm": StreamingLLMCache, "h2o": H2OCache, "gated": GatedCache, "pca": PCACache, "kvsplice": KVSpliceCache,
    "sidecar": SidecarCache, "composed": ComposedCache,
}
BASELINES = ("streamingllm", "h2o")


@pytest.fixture(autouse=True)
def one_thread():
    """The examples are thousands of tiny tensor ops, which one CPU thread runs several times faster than two (measured:
    ~13x on 2 shared cores); the thread count is restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- models and artifacts
@dataclass(frozen=True)
class Model:
    """A tiny random model: `groups` query heads share each of its `kv_heads` KV heads."""

    arch: str
    layers: int
    kv_heads: int
    groups: int
    head_dim: int
    hidden: int
    dtype: str = "float32"


def models(dtypes=("float32",)):
    return st.builds(
        Model, arch=st.sampled_from(sorted(ARCHITECTURES)), layers=st.integers(1, 3), kv_heads=st.sampled_from([1, 2, 4]),
        groups=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16, 32]), hidden=st.sampled_from([32, 64]), dtype=st.sampled_from(dtypes),
    )


@functools.lru_cache(maxsize=32)
def load(spec: Model):
    """The model, built once per spec (the same seeded weights in every dtype)."""
    model = tiny_model(
        spec.arch, hidden_size=spec.hidden, intermediate_size=2 * spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.kv_heads * spec.groups, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
    )
    return model.to(getattr(torch, spec.dtype))


@functools.lru_cache(maxsize=32)
def gates(spec: Model):
    return tiny_gates(load(spec))


@functools.lru_cache(maxsize=32)
def calibration(spec: Model):
    return calibrate(load(spec))


@functools.lru_cache(maxsize=64)
def lowrank(spec: Model, method: str, rank_k: int, rank_v: int):
    """A PCA or KVSplice compressor (KVSplice briefly trained: its quality is not under test)."""
    return calibration(spec).fit(method, uniform(load(spec), rank_k, rank_v, method), SETTINGS, kvsplice_steps=30)[0]


@functools.lru_cache(maxsize=32)
def sidecar(spec: Model, window: int, slots: int, gated: bool = False):
    """An untrained `window`:`slots` sidecar with a random output layer and reference queries from the model's own trajectories,
    carrying the model's gates when `gated` (keep-and-merge)."""
    model, inv_freq = load(spec), rope_inv_freq(load(spec))
    with tempfile.TemporaryDirectory() as directory:
        data = collect_trajectories(model, prompt_ids(3 * 128, seed=7)[0].cpu(), directory, sequences=3, sequence_length=128, query_positions=32, first_query=16)
        references = reference_queries(data, inv_freq, count=16, recent_window=8)
    torch.manual_seed(window * 100 + slots)
    network = SidecarNetwork(spec.layers, spec.kv_heads, spec.head_dim, window, slots, width=32, encoder_layers=1, attention_heads=2, inducing_points=4)
    torch.nn.init.normal_(network.out.weight, std=0.01)
    config = {"base_model": model_signature(model, "tiny"), "cache": {"sink": 4, "window": 8}}
    compressor = SidecarCompressor.from_network(network, references.queries, references.offsets, inv_freq, config)
    return compressor.with_gates(gates(spec)) if gated else compressor


def artifact(spec: Model, kind: str, *shape):
    """An artifact fitted on the float32 copy of the model: ("gate",), ("sidecar", window, slots, gated) or (method, rank_k, rank_v)."""
    fitted = replace(spec, dtype="float32")
    if kind == "gate":
        return gates(fitted)
    if kind == "sidecar":
        return sidecar(fitted, *shape)
    return lowrank(fitted, kind, *shape)


@dataclass
class Spec:
    """A cache: its class (`CACHES`), keyword arguments, and the artifacts its constructor takes by name (see `artifact`)."""

    kind: str
    options: dict
    artifacts: dict = field(default_factory=dict)

    def build(self, model: Model):
        return CACHES[self.kind](**self.options, **{name: artifact(model, *what) for name, what in self.artifacts.items()})


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    """A batch of `width`-token rows, the first `padding[row]` of each left padding; `new_tokens` generated; with `turn`, a
    second call on the same cache (the conversation so far and `turn` new tokens) generates `new_tokens` more."""

    width: int
    padding: tuple
    chunk: int | None  # generate(prefill_chunk_size=...)
    new_tokens: int
    turn: int | None
    seed: int

    @property
    def total(self) -> int:
        """Positions the longest row reaches: a budget or window of this many holds everything."""
        return self.width + self.new_tokens + (self.turn + self.new_tokens if self.turn else 0)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = prompt_ids(self.width, batch=len(self.padding), seed=self.seed)
        mask = torch.ones_like(ids)
        for row, padding in enumerate(self.padding):
            ids[row, :padding], mask[row, :padding] = 0, 0
        return ids, mask, prompt_ids(self.turn or 1, batch=len(self.padding), seed=self.seed + 1)


# Before transformers 5.24, chunked prefill of a second turn (and of padded rows) reaches kvcompress with a mask it refuses as
# right padding (a clear ValueError): chunked prefill is drawn from 5.24 on.
CHUNKED_PREFILL = Version(transformers.__version__) >= Version("5.24")


@st.composite
def inputs(draw, fewest: int = 2):
    """`fewest` to 3 rows. Paddings are whole prefill chunks, so a padded row's chunks end where they end when it runs alone."""
    count, chunk, width = draw(st.integers(fewest, 3)), draw(st.none() | st.integers(4, 32)) if CHUNKED_PREFILL else None, draw(st.integers(20, 120))
    step = chunk or 1
    most = (width - 20) // step
    padding = tuple(step * pads for pads in draw(st.lists(st.integers(0, most), min_size=count, max_size=count)))
    turn = draw(st.none() | st.integers(1, 24))
    return Inputs(width, padding, chunk, draw(st.integers(8, 16)), turn, draw(st.integers(0, 1000)))


def converse(model, cache, inputs: Inputs, rows: slice = slice(None), drop_padding: bool = False, with_logits: bool = False):
    """The tokens `cache` generates for `rows` of the batch (without their padding: one row alone), then for the second turn;
    `with_logits`: and the logits each was chosen from."""
    ids, mask, turn = (t[rows] for t in inputs.tensors())
    if drop_padding:
        start = inputs.padding[rows.start]
        ids, mask = ids[:, start:], mask[:, start:]
    first = greedy(model, cache, ids, mask, new_tokens=inputs.new_tokens, prefill_chunk_size=inputs.chunk, with_logits=with_logits)
    if not inputs.turn:
        return first
    reply = first[0] if with_logits else first
    history, mask = torch.cat([ids, reply, turn], dim=1), torch.cat([mask, torch.ones_like(reply), torch.ones_like(turn)], dim=1)
    second = greedy(model, cache, history, mask, new_tokens=inputs.new_tokens, prefill_chunk_size=inputs.chunk, with_logits=with_logits)
    if with_logits:
        return tuple(torch.cat(pair, dim=1) for pair in zip(first, second))
    return torch.cat([reply, second], dim=1)


@contextlib.contextmanager
def after_every_forward(model, check):
    """Run `check()` after each forward of `model`: every prefill chunk and every decode step."""
    handle = model.register_forward_hook(lambda *_: check())
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------------ caches
SINKS, BLOCKS, WINDOWS = st.integers(0, 8), st.integers(1, 8), st.integers(0, 32)
SHARES = st.floats(0.0, 1.0)
KEEP_RATIOS = st.floats(0.05, 1.0)


def _ranks(draw, model: Model, methods=("pca", "kvsplice")) -> tuple:
    return draw(st.sampled_from(methods)), draw(st.integers(1, model.head_dim)), draw(st.integers(1, model.head_dim))


def _gating(draw) -> dict:
    return {"policy": draw(st.sampled_from(POLICIES)), "allocation": draw(st.sampled_from(ALLOCATIONS))}


@st.composite
def caches(draw, model: Model, budgeted: bool = False):
    """Any cache with valid, usually lossy settings; `budgeted`: only caches with a token budget (or a gate's max_tokens)."""
    kind = draw(st.sampled_from(BASELINES + ("gated", "composed") if budgeted else sorted(CACHES)))
    sink, block = draw(SINKS), draw(BLOCKS)
    if kind in BASELINES:
        budget = draw(st.integers(sink + block, 96).map(lambda tokens: {"budget": tokens}) | st.floats(1.0, 12.0).map(lambda ratio: {"ratio": ratio}))
        shares = {"recent_share": draw(SHARES)} if kind == "h2o" else {}
        return Spec(kind, budget | shares | {"sink": sink, "block_size": block})
    exact = {"sink": sink, "window": draw(WINDOWS), "block_size": block}
    max_tokens = draw(st.integers(1, 32) if budgeted else st.none() | st.integers(1, 32))
    if kind == "gated":
        memory = {"keep_ratio": draw(KEEP_RATIOS)}
        if draw(st.booleans()):  # a budget, met from context= on (a context at which the exact tokens leave room)
            ratio = draw(st.floats(1.5, 8.0))
            memory = {"ratio": ratio, "context": math.ceil(ratio * (sink + exact["window"] + block)) + draw(st.integers(0, 64))}
        return Spec(kind, memory | {"max_tokens": max_tokens} | _gating(draw) | exact, {"compressor": ("gate",)})
    if kind in ("pca", "kvsplice"):
        return Spec(kind, exact, {"compressor": _ranks(draw, model, (kind,))})
    if kind == "sidecar":
        window, gated = draw(st.sampled_from([2, 4, 8])), draw(st.booleans())
        merge = {"merge": draw(st.sampled_from(MERGES)), "sink": sink, "window": exact["window"]} | ({"keep_ratio": draw(KEEP_RATIOS)} if gated else {})
        return Spec(kind, merge, {"compressor": ("sidecar", window, draw(st.integers(1, window)), gated)})
    parts = {"gate": ("gate",)} if budgeted or draw(st.booleans()) else {}
    if draw(st.booleans()):
        parts["lowrank"] = _ranks(draw, model)
    bits = draw(st.sampled_from([4, 8] if not parts else [None, 4, 8]))
    options = {"bits": bits, "group_size": draw(st.sampled_from([2, 4, 8, 16, 32]))} | exact
    if "gate" in parts:
        options |= {"keep_ratio": draw(KEEP_RATIOS), "max_tokens": max_tokens} | _gating(draw)
    return Spec(kind, options, parts)


@st.composite
def lossless(draw, model: Model, total: int):
    """A cache that loses nothing on `total` tokens: a budget or window covering them, ratio 1, or a method keeping everything
    (keep_ratio=1, full-rank PCA, neither quantized)."""
    kind = draw(st.sampled_from(sorted(CACHES)))
    sink, block, covering = draw(SINKS), draw(BLOCKS), draw(st.integers(total, total + 32))
    if kind in BASELINES:  # a block leaves only when whole: a budget covers the sequence with block_size - 1 to spare
        budget = draw(st.sampled_from([{"budget": covering + block - 1}, {"ratio": 1}]))
        shares = {"recent_share": draw(SHARES)} if kind == "h2o" else {}
        return Spec(kind, budget | shares | {"sink": sink, "block_size": block})
    keeps_all = kind in ("gated", "pca", "composed", "sidecar") and draw(st.booleans())  # else the window covers the sequence
    exact = {"sink": sink, "window": draw(WINDOWS) if keeps_all else covering, "block_size": block}
    full = ("pca", model.head_dim, model.head_dim)
    if kind == "gated":
        every = draw(st.sampled_from([{"keep_ratio": 1.0}, {"ratio": 1}]))
        keep = (every if keeps_all else {"keep_ratio": draw(KEEP_RATIOS)}) | {"max_tokens": draw(st.sampled_from([None, covering]))}
        return Spec(kind, keep | _gating(draw) | exact, {"compressor": ("gate",)})
    if kind in ("pca", "kvsplice"):
        return Spec(kind, exact, {"compressor": full if keeps_all else _ranks(draw, model, (kind,))})
    if kind == "sidecar":  # keep-and-merge keeping every token, or a covering window
        window = draw(st.sampled_from([2, 4, 8]))
        options = {"merge": draw(st.sampled_from(MERGES)), "sink": sink, "window": exact["window"]} | ({"keep_ratio": 1.0} if keeps_all else {})
        return Spec(kind, options, {"compressor": ("sidecar", window, draw(st.integers(1, window)), keeps_all or draw(st.booleans()))})
    parts = draw(st.sampled_from([{"gate": ("gate",)}, {"lowrank": full}, {"gate": ("gate",), "lowrank": full}]))
    if keeps_all:
        options = {"bits": None}
    else:
        if "lowrank" in parts:
            parts["lowrank"] = _ranks(draw, model)
        options = {"bits": draw(st.sampled_from([None, 4, 8])), "group_size": draw(st.sampled_from([2, 8, 32]))}
    if "gate" in parts:
        options |= {"keep_ratio": 1.0 if keeps_all else draw(KEEP_RATIOS)} | _gating(draw)
    return Spec(kind, options | exact, parts)


# --------------------------------------------------------------------------------------------------- invariants
@PROFILE
@given(model=models(), inputs=inputs(fewest=1), data=st.data())
def test_lossless_settings_generate_what_dense_generates(model, inputs, data):
    """A budget or window above the sequence, ratio 1, keep_ratio 1 or full rank: the compressed cache is DynamicCache."""
    spec = data.draw(lossless(model, inputs.total), label="cache")
    network = load(model)
    dense = converse(network, DynamicCache(), inputs)
    assert torch.equal(converse(network, spec.build(model), inputs), dense)


# A batch and a row alone multiply matrices of other shapes, so their floats round differently; a quantized cache can then
# round a value to the neighbouring level (measured: one int8 code in 5,184, moving logits by 3e-4). Where two tokens' logits
# are closer than TIE, the row may choose the other one alone (and continue another text); nowhere else.
TIE = 1e-3


@PROFILE
@given(model=models(), inputs=inputs(), data=st.data())
def test_a_left_padded_batch_generates_what_each_row_generates_alone(model, inputs, data):
    """Each row compresses in its own real tokens (`kvcompress.cache`): padding and batch-mates change nothing but float
    rounding, which may break a tie (`TIE`)."""
    spec = data.draw(caches(model), label="cache")
    network = load(model)
    tokens, logits = converse(network, spec.build(model), inputs, with_logits=True)
    for row in range(len(inputs.padding)):
        alone, alone_logits = converse(network, spec.build(model), inputs, slice(row, row + 1), drop_padding=True, with_logits=True)
        differ = (tokens[row] != alone[0]).nonzero()
        if len(differ):  # from here on the row alone continues another text: only this step's logits compare
            step = int(differ[0])
            chosen = torch.stack([tokens[row, step], alone[0, step]])
            gaps = [float(scores[step, chosen].diff().abs()) for scores in (logits[row], alone_logits[0])]
            assert max(gaps) < TIE, f"row {row} of the batch differs from the row alone at token {step}, where the two choices' logits are {gaps} apart"


def _tensors(value):
    """Every tensor in `value`, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    return sum({tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}.values())


def _by_attribute(layer) -> dict:
    """For a failure message: the bytes behind each of the layer's attributes that hold tensors."""
    return {name: _bytes(_tensors(value)) for name, value in vars(layer).items() if _bytes(_tensors(value))}


@PROFILE
@given(model=models(("float32", "bfloat16")), inputs=inputs(fewest=1), data=st.data())
def test_nbytes_counts_every_storage_the_layers_hold(model, inputs, data):
    """`nbytes()` is what the cache holds ("every storage behind its tensors, counted once"), after every forward."""
    cache = data.draw(caches(model), label="cache").build(model)

    def check():
        held = [tensor for layer in cache.layers for tensor in _tensors(vars(layer))]
        assert cache.nbytes() == _bytes(held), f"nbytes() is {cache.nbytes()}, the layers hold {_bytes(held)} (layer 0: {_by_attribute(cache.layers[0])})"

    with after_every_forward(load(model), check):
        converse(load(model), cache, inputs)


def budget(layer) -> torch.Tensor:
    """The tokens each row and KV head may hold (`kvcompress.baselines`, `Budget.at`): the budget, or ceil(seen / ratio) but
    never fewer than the sink and one block's slack; with a gate's `max_tokens` (and its `ratio=`, `GateBudget`), that many
    stored and at most sink + window + block_size - 1 exact (`kvcompress.cache`)."""
    keep, exact = layer.keep, layer.settings
    if keep.budget is None:
        stored = torch.full_like(layer.seen, keep.max_tokens)
        if keep.target is not None:  # the store was filled at fewer tokens seen, and the gates' budget grows with them
            stored = torch.minimum(stored, keep.target.tokens(layer.layer_idx, layer.seen, exact))
        return exact.sink + exact.window + exact.block_size - 1 + stored
    if keep.budget.tokens is not None:
        return torch.full_like(layer.seen, keep.budget.tokens)
    return torch.ceil(layer.seen / keep.budget.ratio).long().clamp(min=exact.sink + exact.block_size - 1)


@PROFILE
@given(model=models(("float32", "bfloat16")), inputs=inputs(fewest=1), data=st.data())
def test_held_tokens_never_exceed_the_token_budget(model, inputs, data):
    """Budgets hold per row and KV head after every forward (every prefill chunk and decode step)."""
    cache = data.draw(caches(model, budgeted=True), label="cache").build(model)

    def check():
        for layer in cache.layers:
            held, bound = layer.tokens_held(), budget(layer)
            assert bool((held <= bound[:, None]).all()), f"layer {layer.layer_idx} holds {held.tolist()} tokens, over {bound.tolist()}; seen {layer.seen.tolist()}"

    with after_every_forward(load(model), check):
        converse(load(model), cache, inputs)


# The documented refusals: an argument outside these is refused with a ValueError or TypeError that names it.
def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


VALID = {
    "budget": lambda v: _whole(v, 1),
    "sink": lambda v: _whole(v, 0),
    "block_size": lambda v: _whole(v, 1),
    "window": lambda v: v is None or _whole(v, 0),
    "max_tokens": lambda v: v is None or _whole(v, 1),
    "ratio": lambda v: v is None or (_real(v) and v >= 1),
    "recent_share": lambda v: _real(v) and 0 <= v <= 1,
    "keep_ratio": lambda v: v is None or (_real(v) and 0 < v <= 1),
    "policy": lambda v: v in POLICIES,
    "allocation": lambda v: v in ALLOCATIONS,
    "merge": lambda v: v in MERGES,
    "mode": lambda v: v is None or v in MODES,
    "bits": lambda v: v is None or (_whole(v, 0) and v in (4, 8)),
    "group_size": lambda v: _whole(v, 2) and v % 2 == 0,
    "context": lambda v: _whole(v, 1),
}
INVALID = {
    "budget": [0, -1, 2.5, "16", True],
    "sink": [-1, 1.5, "4", False],
    "block_size": [0, -4, 1.5, True],
    "window": [-1, 2.5, "8"],
    "max_tokens": [0, -3, 2.5, True],
    "ratio": [0.5, 0, -2, math.inf, math.nan, "8", True],
    "recent_share": [-0.1, 1.5, True, "half"],
    "keep_ratio": [0, -0.5, 1.5, True, "0.5"],
    "policy": ["heads", None],
    "allocation": ["fair", None],
    "merge": ["average", None],
    "mode": ["keep", "gates"],
    "bits": [2, 3, 16, True, "8"],
    "group_size": [0, 1, 7, -2, 3.0, True],
    "context": [0, -5, 2.5, "4096", True],
}


@st.composite
def settings_of(draw, model: Model):
    """Any cache with mostly valid settings, each invalid one time in sixteen, edge values included."""

    def arg(name, valid):
        return draw(st.sampled_from(INVALID[name]) if name in INVALID and draw(st.integers(0, 15)) == 0 else valid)

    def sometimes() -> bool:
        return draw(st.integers(0, 3)) == 0

    kind = draw(st.sampled_from(sorted(CACHES)))
    options = {"sink": arg("sink", st.integers(0, 16))}
    if kind in BASELINES:
        options["block_size"] = arg("block_size", st.integers(1, 32))
        knobs = draw(st.sampled_from([("budget",), ("ratio",), ("budget",), ("ratio",), ("budget", "ratio"), ()]))
        options |= {name: arg(name, st.integers(1, 200) if name == "budget" else st.floats(1.0, 64.0)) for name in knobs}
        if kind == "h2o":
            options["recent_share"] = arg("recent_share", SHARES)
        return Spec(kind, options)
    options["window"] = arg("window", st.none() | st.integers(0, 64))
    if kind != "sidecar":
        options["block_size"] = arg("block_size", st.integers(1, 32))
    if sometimes():  # the memory knob, met at `context` tokens
        options |= {"ratio": arg("ratio", st.floats(1.0, 32.0)), "context": arg("context", st.integers(16, 8192))}
    parts = {}
    if kind in ("gated", "composed") and (kind == "gated" or draw(st.booleans())):
        parts["gate"] = ("gate",)
    if kind in ("pca", "kvsplice") or (kind == "composed" and draw(st.booleans())):
        parts["lowrank"] = _ranks(draw, model, (kind,) if kind != "composed" else ("pca", "kvsplice"))
    if kind == "sidecar":
        window = draw(st.sampled_from([2, 4, 8]))
        parts["sidecar"] = ("sidecar", window, draw(st.integers(1, window)), draw(st.booleans()))
        options["merge"] = arg("merge", st.sampled_from(MERGES))
        options["mode"] = arg("mode", st.none() | st.sampled_from(MODES))
    if kind == "composed":
        options |= {"bits": arg("bits", st.sampled_from([None, 4, 8])), "group_size": arg("group_size", st.sampled_from([2, 4, 8, 16, 32, 64]))}
    if "gate" in parts or (kind == "sidecar" and (parts["sidecar"][-1] or sometimes())) or (kind == "composed" and sometimes()):  # without a gate, keep_ratio is refused
        options["keep_ratio"] = arg("keep_ratio", st.none() | KEEP_RATIOS)
    if "gate" in parts:
        options |= {"policy": arg("policy", st.sampled_from(POLICIES)), "allocation": arg("allocation", st.sampled_from(ALLOCATIONS)),
                    "max_tokens": arg("max_tokens", st.none() | st.integers(1, 64))}
    argument = "compressor" if kind in ("gated", "pca", "kvsplice", "sidecar") else None
    return Spec(kind, options, {argument or name: what for name, what in parts.items()})


def refused(spec: Spec) -> set[str]:
    """The arguments the documentation says must be refused: each one invalid alone, and the combinations that cannot hold."""
    options, bad = spec.options, {name for name, value in spec.options.items() if not VALID[name](value)}
    passed = {name for name in ("budget", "ratio", "keep_ratio", "window") if options.get(name) is not None}
    if spec.kind in BASELINES:
        if len(passed & {"budget", "ratio"}) != 1:
            bad |= {"budget", "ratio"}
        elif "budget" in passed and not bad & {"budget", "sink", "block_size"}:
            if options["sink"] >= options["budget"] or options["sink"] + options["block_size"] > options["budget"]:
                bad |= {"budget", "sink", "block_size"}
    elif {"keep_ratio", "ratio"} <= passed and spec.kind in ("gated", "composed"):
        bad |= {"keep_ratio", "ratio"}
    elif {"window", "ratio"} <= passed and spec.kind in ("pca", "kvsplice"):
        bad |= {"window", "ratio"}
    if spec.kind == "sidecar" and "mode" not in bad:
        gated = spec.artifacts["compressor"][-1]
        mode = options.get("mode") or ("keep_and_merge" if gated else "merge")
        if mode == "keep_and_merge" and not gated:
            bad |= {"mode"}
        elif mode == "merge" and "keep_ratio" in passed:
            bad |= {"mode", "keep_ratio"}
        elif {"window", "ratio"} <= passed and mode == "merge":
            bad |= {"window", "ratio"}
        elif {"keep_ratio", "ratio"} <= passed and mode == "keep_and_merge":
            bad |= {"keep_ratio", "ratio"}
    if spec.kind == "composed" and "gate" not in spec.artifacts:
        if passed & {"keep_ratio", "ratio"}:
            bad |= {"keep_ratio", "ratio"}
        if "lowrank" not in spec.artifacts and "bits" in options and options["bits"] is None:
            bad |= {"bits"}
    return bad


@PROFILE
@given(model=models(("float32", "bfloat16")), inputs=inputs(fewest=1), data=st.data())
def test_only_documented_refusals_are_raised(model, inputs, data):
    """Any settings, model and inputs: the cache generates, or refuses with a ValueError/TypeError naming a bad argument
    (with `ratio=`, the knob may also be unreachable); invalid settings are never accepted, and nothing else is raised."""
    spec = data.draw(settings_of(model), label="cache")
    bad = refused(spec)
    try:
        generated = converse(load(model), spec.build(model), inputs)
    except (ValueError, TypeError) as error:
        event(f"{spec.kind}: refused")
        arguments = inspect.signature(CACHES[spec.kind]).parameters
        named = {name for name in arguments if re.search(rf"\b{name}\b", str(error))}
        allowed = (bad | ({"ratio"} if "ratio" in spec.options else set())) if bad else set(arguments)
        assert named & allowed, f"{type(error).__name__} names none of {sorted(allowed)}: {error}"
        return
    event(f"{spec.kind}: generated")
    assert not bad, f"invalid {sorted(bad)} accepted"
    assert generated.shape == (len(inputs.padding), inputs.new_tokens * (2 if inputs.turn else 1))

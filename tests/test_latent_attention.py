"""Decode attention over a low-rank store read in latent space: the PyTorch path against decoding the
store, and the Triton kernel against the PyTorch path (on a GPU, or on the CPU under Triton's
interpreter, which `test_the_kernel_tests_pass_under_the_triton_interpreter` runs)."""

from collections import defaultdict

import pytest
import torch
from conftest import DEVICE, assert_pass_under_triton_interpreter, prompt_ids, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from test_gates import tiny_gates
from test_lowrank import SETTINGS, calibrate, uniform

from kvcompress import ComposedCache, PCACache, cache_kwargs, latent_attention, tail_attention
from kvcompress.attention import _attend_over_slots
from kvcompress.cache import CompressedLayer
from kvcompress.config import HeadRanks
from kvcompress.slots import FILLER
from kvcompress.softmax import merge_softmax, softmax_part_


@pytest.fixture(scope="module")
def parts():
    """A model the kernel runs on (head_dim 32; 3 query heads per KV head), its gates, and PCA at uniform, mixed,
    uniform rank-16 and rank-15 ranks (the kernel reads rank-16 latents as whole rows, rank 15's and the values of the
    others through aligned windows, the rest column by column)."""
    model = tiny_model("llama", hidden_size=96, head_dim=32, num_attention_heads=6, num_key_value_heads=2)
    calibration = calibrate(model)
    mixed = uniform(model, 6, 10)
    mixed.heads[0, 0] = HeadRanks(3, 20)
    mixed.heads[1, 1] = HeadRanks(17, 2)
    fitted = {
        name: calibration.fit("pca", ranks, SETTINGS)[0]
        for name, ranks in (("pca", uniform(model, 6, 10)), ("mixed", mixed), ("rank 16", uniform(model, 16, 16)), ("rank 15", uniform(model, 15, 15)))
    }
    return model, tiny_gates(model), fitted


CACHES = {
    "pca": lambda gates, pca: PCACache(pca["pca"]),
    "pca, mixed ranks": lambda gates, pca: PCACache(pca["mixed"]),
    "pca, rank 16": lambda gates, pca: PCACache(pca["rank 16"]),  # whole rows, heads side by side
    "pca, rank 15": lambda gates, pca: PCACache(pca["rank 15"]),  # the second head's latents start at an odd column: windows
    "gates x pca x int4": lambda gates, pca: ComposedCache(gates, pca["mixed"], keep_ratio=0.5, bits=4),  # per-head latents
    "gates x pca-16 x int4": lambda gates, pca: ComposedCache(gates, pca["rank 16"], keep_ratio=0.5, bits=4, group_size=8),  # whole rows, two groups
    "gates x pca-16 x int8": lambda gates, pca: ComposedCache(gates, pca["rank 16"], keep_ratio=0.5, bits=8, group_size=16),
}


def padded_prompt(length: int = 200, padding: int = 13):
    """Two rows, the second left-padded: its store holds filler slots."""
    ids = prompt_ids(length, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :padding], mask[1, :padding] = 0, 0
    return ids, mask


@torch.no_grad()
def decode_logits(model, cache, ids, mask, prefill: int = 150, chunk: int = 40):
    """Logits of a prefill in chunks (all but the first attend to a store) and then one decode step per remaining token."""
    logits = []
    for start in [*range(0, prefill, chunk), *range(prefill, ids.shape[1])]:
        end = min(start + chunk, prefill) if start < prefill else start + 1
        logits.append(model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


CALLS = 2 * (3 + 50)  # per layer: three prefill chunks after the first, and 50 decode steps


ATTEND = CompressedLayer.attend_with_store


def outputs_on_the_same_states(model, cache, reference, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill chunks and decode steps of the padded prompt; at every attention over a store, its output and
    `reference(layer, query, new_keep, scaling)` on the same state (comparing logits instead would let a gate that flips
    on a rounding difference decide the outcome)."""
    pairs = []

    def both(layer, query, new_keep, scaling):
        output = ATTEND(layer, query, new_keep, scaling)
        pairs.append((output, reference(layer, query, new_keep, scaling)))
        return output

    monkeypatch.setattr(CompressedLayer, "attend_with_store", both)
    decode_logits(model, cache, *padded_prompt())
    monkeypatch.setattr(CompressedLayer, "attend_with_store", ATTEND)
    return pairs


def decoding_the_store(layer, query, new_keep, scaling):
    """Attention over the store decoded to keys and values, joined with the tail, as caches without `attends_store` do it."""
    keys, values = layer.encoding.decode(layer, layer.store)
    keys, values = torch.cat([keys, layer.tail["keys"]], dim=2), torch.cat([values, layer.tail["values"]], dim=2)
    return _attend_over_slots(layer, query, keys, values, new_keep, None, scaling)[0]


@pytest.mark.parametrize("name", sorted(CACHES))
def test_attention_over_the_latents_equals_decoding_them(parts, name, monkeypatch):
    model, *artifacts = parts
    monkeypatch.setattr(latent_attention, "available", lambda *args: False)  # the PyTorch path, on any device
    returned_more_than_the_tail = []
    update = CompressedLayer.update

    def watched(layer, key_states, value_states, *args, **kwargs):
        keys, values = update(layer, key_states, value_states, *args, **kwargs)
        returned_more_than_the_tail.append(keys.shape[2] > layer.tail_length)
        return keys, values

    monkeypatch.setattr(CompressedLayer, "update", watched)
    cache = CACHES[name](*artifacts)
    pairs = outputs_on_the_same_states(model, cache, decoding_the_store, monkeypatch)
    assert len(pairs) == CALLS and len(returned_more_than_the_tail) == 2 + CALLS and not any(returned_more_than_the_tail)  # never decoded
    assert bool((cache.layers[0].store["token_ids"][1] == FILLER).any())  # the padded row's gaps are masked
    for latent, decoded in pairs:
        assert torch.allclose(latent, decoded, atol=1e-5)


def kernel_runs() -> bool:
    return latent_attention.available(torch.empty(1, 32, device=DEVICE))


needs_kernel = pytest.mark.skipif(not kernel_runs(), reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1 (test_the_kernel_tests_pass_under_the_triton_interpreter)")


@needs_kernel
@pytest.mark.parametrize("name", sorted(CACHES))
def test_kernel_equals_the_pytorch_path(parts, name, monkeypatch):
    model, *artifacts = parts
    monkeypatch.setattr(latent_attention, "BLOCK_SLOTS", 32)  # several blocks per span, the last one partly outside the store
    monkeypatch.setattr(latent_attention, "PROGRAMS_WANTED", 8)
    launches = []
    store_partials = latent_attention.store_partials
    monkeypatch.setattr(latent_attention, "store_partials", lambda *args: launches.append(args[3].shape[2]) or store_partials(*args))

    def pytorch_path(layer, query, new_keep, scaling):
        with monkeypatch.context() as patch:
            patch.setattr(latent_attention, "available", lambda *args: False)
            return ATTEND(layer, query, new_keep, scaling)

    pairs = outputs_on_the_same_states(model, CACHES[name](*artifacts), pytorch_path, monkeypatch)
    assert len(pairs) == len(launches) == CALLS and max(launches) > 2 * latent_attention.BLOCK_SLOTS  # every chunk and step; spans of several blocks
    for kernel, pytorch in pairs:
        assert torch.allclose(kernel, pytorch, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("programs_wanted", [1, 512])
def test_kernel_rotates_keys_at_far_positions_and_splits_long_stores(parts, programs_wanted, monkeypatch):
    """Token ids up to 500k (RoPE angles of 500k radians), 1,000 slots in one span or split across several (merged only
    then), fillers among them."""
    monkeypatch.setattr(latent_attention, "PROGRAMS_WANTED", programs_wanted)
    merges, merge_softmax = [], latent_attention.merge_softmax
    monkeypatch.setattr(latent_attention, "merge_softmax", lambda *args, **kwargs: merges.append(args[0].shape[1]) or merge_softmax(*args, **kwargs))
    pca = parts[2]["pca"]
    generator = torch.Generator().manual_seed(0)
    batch, heads, slots, dim = 1, 2, 1000, 32
    queries = torch.randn(batch, heads, 3, dim, generator=generator).to(DEVICE)
    key_latents = torch.randn(batch, 1, slots, 2 * 6, generator=generator).to(DEVICE)
    value_latents = torch.randn(batch, 1, slots, 2 * 10, generator=generator).to(DEVICE)
    token_ids = torch.randint(0, 500_000, (batch, 1, slots), generator=generator, dtype=torch.int32).expand(batch, heads, slots).contiguous()
    token_ids[..., ::7] = FILLER
    attend = lambda: pca.attend_store(1, queries, key_latents, value_latents, token_ids.to(DEVICE), 0.2)  # noqa: E731
    kernel = attend()
    assert merges == ([] if programs_wanted == 1 else [8])  # 1,000 slots in blocks of 128, for 2 (row, head) programs
    monkeypatch.setattr(latent_attention, "available", lambda *args: False)
    for got, expected in zip(kernel, attend()):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_block_too_large_for_shared_memory_is_halved(parts, monkeypatch):
    """Near-full ranks of 128-dim heads need more shared memory for a block of 128 slots than an H200 has (found
    calibrating PCA on the Llama-3.1-8B shape): the block is halved until it fits, once per shape, with the same result."""
    pca = parts[2]["pca"]
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 2, 3, 32, generator=generator).to(DEVICE)
    key_latents, value_latents = (torch.randn(1, 1, 300, 2 * rank, generator=generator).to(DEVICE) for rank in (6, 10))
    token_ids = torch.arange(300, dtype=torch.int32).expand(1, 2, 300).contiguous().to(DEVICE)
    attend = lambda: pca.attend_store(1, queries, key_latents, value_latents, token_ids, 0.2)  # noqa: E731
    kernel, launched = latent_attention._store_partials_kernel, []

    class SmallSharedMemory:  # a GPU on which only blocks of 32 slots fit
        def __getitem__(self, grid):
            def launch(*args, BLOCK, **kwargs):
                launched.append(BLOCK)
                if BLOCK > 32:
                    raise latent_attention.OutOfResources(BLOCK * 1000, 32 * 1000, "shared memory")
                return kernel[grid](*args, BLOCK=BLOCK, **kwargs)

            return launch

    monkeypatch.setattr(latent_attention, "_store_partials_kernel", SmallSharedMemory())
    monkeypatch.setattr(latent_attention, "_FITTING_BLOCK", {})
    first, second = attend(), attend()
    assert launched == [128, 64, 32, 32]  # halved twice, then straight to the block that fits
    monkeypatch.setattr(latent_attention, "available", lambda *args: False)
    for result in (first, second):
        for got, expected in zip(result, attend()):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_tail_kernel_merges_the_store_with_what_the_tail_lets_each_row_see():
    """The decode step's tail kernel against PyTorch: fillers among a row's tail slots, a row whose new token does not see
    itself (padding), a row that sees nothing of its tail (it keeps the store's output), strided query rows."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, rows, length, dim = 3, 2, 5, 70, 32
    queries = torch.randn(batch, rows, heads, dim, generator=generator).transpose(1, 2)
    keys, values = (torch.randn(batch, heads, length, dim, generator=generator) for _ in range(2))
    token_ids = torch.arange(length, dtype=torch.int32).expand(batch, heads, length).clone()
    token_ids[0, :, 3:9] = FILLER
    token_ids[2, :, :-1] = FILLER
    new_seen = torch.tensor([True, False, False])
    store = (torch.randn(batch, heads, rows, generator=generator), torch.rand(batch, heads, rows, generator=generator) + 0.5, torch.randn(batch, heads, rows, dim, generator=generator))
    seen = (token_ids != FILLER)[:, :, None, :].clone()
    seen[..., -1] &= new_seen[:, None, None]
    logits = (queries @ keys.transpose(-1, -2) * 0.3).masked_fill(~seen, float("-inf"))
    top, total, weighted = merge_softmax(*(torch.stack(pair) for pair in zip(store, softmax_part_(logits, values))), dim=0)
    got = tail_attention.attend_tail(*(t.to(DEVICE) for t in (queries, keys, values, token_ids, new_seen)), tuple(t.to(DEVICE) for t in store), 0.3)
    assert torch.allclose(got.cpu(), weighted / total[..., None], atol=1e-5)
    assert torch.allclose(got[2].cpu(), store[2][2] / store[1][2][..., None], atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiling is what is counted: on a GPU")
@pytest.mark.parametrize("name", ["pca, rank 16", "gates x pca-16 x int4"])
def test_kernel_is_compiled_once_as_the_store_grows(parts, name, monkeypatch):
    """Compressions change the store's length and capacity at almost every block; had the kernel been specialized on
    them, each new divisibility by 16 would compile it again (a second or more, in the middle of decoding)."""
    kernel = latent_attention._store_partials_kernel
    monkeypatch.setattr(kernel, "device_caches", defaultdict(kernel.create_binder))  # count from none compiled
    model, *artifacts = parts
    cache = CACHES[name](*artifacts)
    capacities = set()
    attend = CompressedLayer.attend_with_store
    monkeypatch.setattr(CompressedLayer, "attend_with_store", lambda layer, *args: capacities.add(layer.store_capacity()) or attend(layer, *args))
    decode_logits(model, cache, *padded_prompt())
    assert len(capacities) > 5 and sum(len(caches[0]) for caches in kernel.device_caches.values()) == 1


@given(st.lists(st.integers(1, 70), min_size=2, max_size=12))
def test_aligned_windows_hold_each_heads_columns_inside_the_row(ranks):
    row, starts = sum(ranks), [sum(ranks[:head]) for head in range(len(ranks))]
    windows = latent_attention.aligned_windows(ranks)
    needed = max(rank + start % 2 for start, rank in zip(starts, ranks))  # an odd start needs one column more
    width = max(16, 1 << (needed - 1).bit_length())
    if row % 2 or row < width:  # odd rows are never aligned; a row narrower than a window has no room to shift it
        assert windows is None
        return
    firsts, got = windows
    assert got == width
    for first, start, rank in zip(firsts, starts, ranks):
        assert first % 2 == 0 and 0 <= first <= start and start + rank <= first + width <= row


def test_kernel_layout_of_rank_15_heads_side_by_side_decodes_each_heads_columns(parts):
    """The window decoder puts each head's decoder rows where its columns sit in its window: a window of latents times it
    is the head's latents times its own decoder."""
    pca = parts[2]["rank 15"]
    keys, _ = pca.projections(0, torch.device("cpu"), torch.float32)
    latents = torch.randn(2, 1, 5, 30)
    decoder, (table, step), width = keys.kernel_layout(latents)
    assert step == latent_attention.WINDOWS and width == 16 and table.tolist() == [[0, 16], [14, 16]]
    for head, (first, _) in enumerate(table.tolist()):
        own = latents[..., 15 * head : 15 * head + 15] @ keys.decoder[head, :15]
        assert torch.allclose(latents[..., first : first + width] @ decoder[head], own, atol=1e-5)
    assert keys.kernel_layout(torch.randn(2, 2, 5, 15))[1][1] == 0  # per-head latents: whole rows of their own


@pytest.mark.skipif(kernel_runs(), reason="the kernel tests above run in this process (on a GPU, or under the interpreter already)")
def test_the_kernel_tests_pass_under_the_triton_interpreter():
    assert_pass_under_triton_interpreter(__file__, "kernel_equals or kernel_rotates or too_large_for_shared or tail_kernel", len(CACHES) + 4)


@pytest.mark.parametrize(("name", "tolerance"), [("pca, mixed ranks", 1e-5), ("gates x pca x int4", 1e-4)])
def test_chunked_attention_over_store_and_tail_equals_one_chunk(parts, name, tolerance, monkeypatch):
    """With a tiny score budget, attention over the tail (`attend_with_store`) and over the latents (the PyTorch path of
    `attend_store`) run in many chunks of queries and of slots; the result is the one-chunk result. Quantized latents
    get one float16 step more: chunks sum in another order, and a group's float16 scale can round to the next value
    (seen: one scale of layer 1's keys, with every int4 code equal, moved the logits by 2e-5)."""
    from kvcompress import cache as cache_module
    from kvcompress import lowrank as lowrank_module

    model, gates, pca = parts
    monkeypatch.setattr(latent_attention, "available", lambda *args: False)
    ids, mask = padded_prompt()
    whole = decode_logits(model, CACHES[name](gates, pca), ids, mask)
    chunks = []
    attend = cache_module.CompressedLayer.attend_with_store
    monkeypatch.setattr(cache_module.CompressedLayer, "attend_with_store", lambda layer, query, *args: chunks.append(query.shape[2]) or attend(layer, query, *args))
    for module in (cache_module, lowrank_module):
        monkeypatch.setattr(module, "SCORES_PER_CHUNK", 240)  # one query per chunk of the tail, about 20 slots per chunk of the store
    assert torch.allclose(decode_logits(model, CACHES[name](gates, pca), ids, mask), whole, atol=tolerance)
    assert max(chunks) == 40  # prefill chunks of 40 queries went through in pieces


@pytest.mark.skipif(latent_attention.triton is None, reason="Triton is not installed")
def test_a_kernel_that_needs_more_shared_memory_than_the_gpu_has_runs_with_a_smaller_block_remembered():
    """Gemma's head_dim 256 in float32 asked 283 KB of an H200's 227 KB at H2O's block of 64 slots (found on the device);
    `launch_fitting` halves the block until the kernel fits, and starts the next call there."""
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(block):
        tried.append(block)
        if block > 16:
            raise OutOfResources(block * 4432, 232448 // 4, "shared memory")

    key = ("test kernel", "needs a block of 16")
    latent_attention.launch_fitting(torch.zeros(1), key, 64, launch)
    latent_attention.launch_fitting(torch.zeros(1), key, 64, launch)
    assert tried == [64, 32, 16, 16]

    def never_fits(block):
        raise OutOfResources(10**9, 232448, "shared memory")

    with pytest.raises(OutOfResources):  # not even the smallest block: the error reaches the caller
        latent_attention.launch_fitting(torch.zeros(1), ("test kernel", "never fits"), 64, never_fits)

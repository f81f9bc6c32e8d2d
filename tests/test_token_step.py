"""The per-token step's kernel (`kvcompress.token_step`: the token leaving the window, H2O's admission) against a plain
reference and against the PyTorch path of whole decodes, on a GPU or on the CPU under Triton's interpreter
(`test_the_token_step_tests_pass_under_the_triton_interpreter` runs them there)."""


import pytest
import torch
from conftest import DEVICE, assert_layers_equal, assert_parts_equal, assert_pass_under_triton_interpreter, greedy, prompt_ids, tiny_model, watch_hand_one
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress import H2OCache, StreamingLLMCache, token_step


def kernel_runs() -> bool:
    return token_step.available(torch.empty(1, device=DEVICE))


needs_kernel = pytest.mark.skipif(not kernel_runs(), reason="the Triton kernels need a GPU or TRITON_INTERPRET=1 (test_the_token_step_tests_pass_under_the_triton_interpreter)")


def slots_with_room(batch, heads, length, dim, dtype, generator, scored=True):
    """A part as the cache holds it: views of the first `length` slots of buffers with room for more."""
    room = length + 5
    part = {
        "keys": torch.randn(batch, heads, room, dim, generator=generator).to(dtype),
        "values": torch.randn(batch, heads, room, dim + 16, generator=generator).to(dtype),  # values may be wider than keys
        "token_ids": torch.stack([torch.randperm(room, generator=generator) for _ in range(batch * heads)]).view(batch, heads, room).int(),
        "scores": torch.rand(batch, heads, room, generator=generator).round(decimals=1) if scored else None,  # rounded: ties
    }
    return {name: None if t is None else t.to(DEVICE)[:, :, :length] for name, t in part.items()}


def reference_hand_one(tail, last, oldest):
    """Per (row, head): take out the slot holding `oldest` (slot 0 when none does), move slot `last` into its place."""
    tail = {name: None if t is None else t.clone() for name, t in tail.items()}
    leaving = {name: None if t is None else t[:, :, :1].clone() for name, t in tail.items()}
    for row in range(tail["token_ids"].shape[0]):
        for head in range(tail["token_ids"].shape[1]):
            found = (tail["token_ids"][row, head, : last + 1] == oldest).nonzero()
            where = int(found[0]) if len(found) else 0
            for name, t in tail.items():
                if t is not None:
                    leaving[name][row, head, 0] = t[row, head, where]
                    t[row, head, where] = t[row, head, last].clone()
    return tail, leaving


def reference_replace_lowest(store, incoming):
    """Per (row, head): the incoming slot replaces the latest of the lowest-scored slots if it scores higher."""
    store = {name: None if t is None else t.clone() for name, t in store.items()}
    for row in range(store["scores"].shape[0]):
        for head in range(store["scores"].shape[1]):
            scores = store["scores"][row, head]
            at = int((scores == scores.min()).nonzero()[-1])
            if incoming["scores"][row, head, 0] > scores[at]:
                for name, t in store.items():
                    if t is not None:
                        t[row, head, at] = incoming[name][row, head, 0]
    return store


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(1, 40), dim=st.sampled_from([8, 48, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), scored=st.booleans(), oldest_at=st.integers(0, 60), seed=st.integers(0, 2**16),
)
def test_hand_one_equals_the_reference(batch, heads, length, dim, dtype, scored, oldest_at, seed):
    """Any tail (a view of a buffer with room), the leaving token anywhere, the last slot itself, or in no slot at all."""
    tail = slots_with_room(batch, heads, length, dim, dtype, torch.Generator().manual_seed(seed), scored)
    oldest = int(tail["token_ids"][0, 0, oldest_at]) if oldest_at < length else 10_000  # else: no slot holds it
    expected_tail, expected_leaving = reference_hand_one(tail, length - 1, oldest)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(token_step, "BLOCK_SLOTS", 16)  # the scan for the token crosses blocks
        leaving = token_step.hand_one(tail, length - 1, oldest)
    assert_parts_equal(tail, expected_tail)
    assert_parts_equal(leaving, expected_leaving)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(1, 40), stored=st.integers(1, 40), dim=st.sampled_from([8, 48, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), oldest_at=st.integers(0, 60), seed=st.integers(0, 2**16),
)
def test_hand_one_admitting_into_the_store_equals_the_reference(batch, heads, length, stored, dim, dtype, oldest_at, seed):
    """H2O's step in one kernel: the token leaving the tail replaces the store's lowest-scored slot if it scores higher. Ties
    among the lowest (the latest goes), also in different blocks of the scan, a leaving score equal to the lowest (nothing
    changes), a store of one slot."""
    generator = torch.Generator().manual_seed(seed)
    tail, store = slots_with_room(batch, heads, length, dim, dtype, generator), slots_with_room(batch, heads, stored, dim, dtype, generator)
    oldest = int(tail["token_ids"][0, 0, oldest_at]) if oldest_at < length else 10_000
    expected_tail, leaving = reference_hand_one(tail, length - 1, oldest)
    expected_store = reference_replace_lowest(store, leaving)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(token_step, "BLOCK_SLOTS", 16)  # the token, the lowest scores and their ties are found across blocks
        assert token_step.hand_one(tail, length - 1, oldest, admit_into=store) is None
    assert_parts_equal(tail, expected_tail)
    assert_parts_equal(store, expected_store)


@needs_kernel
@pytest.mark.parametrize("cache_class", [StreamingLLMCache, H2OCache])
@pytest.mark.parametrize("budget", [dict(budget=24), dict(ratio=3)])
def test_decodes_with_the_kernels_equal_the_pytorch_path(monkeypatch, cache_class, budget):
    """Whole decodes, the store growing by a slot in place at a ratio: the same tokens and the same slots, slot for slot."""
    model = tiny_model("llama", max_position_embeddings=512).to(DEVICE)
    ids = prompt_ids(400, batch=2).to(DEVICE)  # at 3:1 a store of over 64 slots: room (1/32) to grow in place
    steps = watch_hand_one(monkeypatch)
    with_kernels = cache_class(**budget)
    tokens = greedy(model, with_kernels, ids, new_tokens=30)
    assert sum(ran for ran, _ in steps) > 20
    assert (cache_class is H2OCache and "ratio" in budget) == any(ran and grew == 1 for ran, grew in steps)  # a ratio's store grows in place
    monkeypatch.setattr(token_step, "available", lambda *_: False)
    pytorch = cache_class(**budget)
    assert torch.equal(greedy(model, pytorch, ids, new_tokens=30), tokens)
    assert_layers_equal(with_kernels, pytorch)


@pytest.mark.skipif(kernel_runs(), reason="the kernel tests above run in this process (on a GPU, or under the interpreter already)")
def test_the_token_step_tests_pass_under_the_triton_interpreter():
    assert_pass_under_triton_interpreter(__file__, "equal", 6)

"""Triton kernels for the per-token step of a budgeted cache on a GPU: the token that leaves the window, and H2O's admission.

At single-token blocks a budgeted cache (StreamingLLM, H2O) moves one token per layer and decode step:
the oldest token after the sink leaves the tail, the tail's last slot fills its place, and H2O's store
takes the token in place of its lowest-scored heavy hitter if the token scores higher. In PyTorch that
is some 60 small operations per layer for H2O, 25 for StreamingLLM (gathers, scatters and index
arithmetic for each of keys, values, token ids and scores), and at batch 64 on an H200 launching
them bound the step (H2O: 99 ms a step, the GPU busy for a third of it). Here the step is one kernel with one program per (row, KV
head), H2O's admission included (`KeepPolicy.replaces_lowest_scored`). Like the attention kernels they run on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests check them against the PyTorch path.
"""

from __future__ import annotations

from .latent_attention import on_device_of, triton, triton_runs_on

if triton is not None:
    import triton.language as tl

BLOCK_SLOTS = 1024  # token ids or scores scanned per inner step

available = triton_runs_on  # whether the kernels can run on a tensor's device


def _layout(slots: dict) -> tuple:
    """(keys, values, token ids, scores or a stand-in) of a part, whether it has scores, and the kernels' shared arguments
    (strides of rows, heads and slots) and sizes. Slots must be the last-but-one dimension with the numbers of a slot
    contiguous, as the cache's buffers are."""
    keys, values, token_ids, scores = slots["keys"], slots["values"], slots["token_ids"], slots.get("scores")
    for tensor in (keys, values):
        assert tensor.stride(-1) == 1, "a slot's numbers must be contiguous"
    assert token_ids.stride(-1) == 1 and (scores is None or scores.stride(-1) == 1)
    has_scores, scores = scores is not None, token_ids if scores is None else scores
    strides = (*keys.stride()[:3], *values.stride()[:3], *token_ids.stride()[:2], *scores.stride()[:2])
    sizes = dict(
        HEADS=token_ids.shape[1], KEY_DIM=keys.shape[-1], VALUE_DIM=values.shape[-1], KEY_WIDTH=triton.next_power_of_2(keys.shape[-1]),
        VALUE_WIDTH=triton.next_power_of_2(values.shape[-1]), BLOCK=BLOCK_SLOTS,
    )
    return keys, values, token_ids, scores, has_scores, strides, sizes


def hand_one(tail: dict, last: int, oldest: int, admit_into: dict | None = None) -> dict | None:
    """Take the slot holding token `oldest` out of each (row, head) of `tail`, and move the slot `last` into its place.

    `tail`: keys/values ``[B, H, T, D]``, token_ids ``[B, H, T]`` and scores ``[B, H, T]`` or None. Returns the
    slots taken out (``[B, H, 1, ...]`` per tensor), as `CompressedLayer._hand_one_in_place`'s PyTorch path does
    (a (row, head) without the token gives up its slot 0, as an argmax over no match does). With `admit_into` (a
    store with scores, as `tail`), each slot taken out goes instead in place of that (row, head)'s lowest-scored store
    slot (the latest of them, on a tie) if it scores higher, as `HeavyHitters.admit` does; nothing is returned then.
    """
    keys, values, token_ids, scores, has_scores, strides, sizes = _layout(tail)
    batch, heads = token_ids.shape[:2]
    leaving = None if admit_into is not None else {
        "keys": keys.new_empty(batch, heads, 1, keys.shape[-1]),
        "values": values.new_empty(batch, heads, 1, values.shape[-1]),
        "token_ids": token_ids.new_empty(batch, heads, 1),
        "scores": scores.new_empty(batch, heads, 1) if has_scores else None,
    }
    to_keys, to_values, to_ids, to_scores, _, to_strides, _ = _layout(admit_into if admit_into is not None else leaving)
    with on_device_of(keys):
        _hand_one_kernel[(batch * heads,)](
            keys, values, token_ids, scores, to_keys, to_values, to_ids, to_scores, last, oldest, to_ids.shape[2], *strides, *to_strides,
            HAS_SCORES=has_scores, ADMIT=admit_into is not None, **sizes,
        )
    return leaving


if triton is not None:

    @triton.jit(
        do_not_specialize=["last", "oldest", "length", "k_sb", "k_sh", "v_sb", "v_sh", "i_sb", "i_sh", "s_sb", "s_sh", "tk_sb", "tk_sh", "tv_sb", "tv_sh", "ti_sb", "ti_sh", "ts_sb", "ts_sh"],
    )
    def _hand_one_kernel(
        k_ptr, v_ptr, ids_ptr, scores_ptr, to_k_ptr, to_v_ptr, to_ids_ptr, to_scores_ptr, last, oldest, length,
        k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, i_sb, i_sh, s_sb, s_sh, tk_sb, tk_sh, tk_ss, tv_sb, tv_sh, tv_ss, ti_sb, ti_sh, ts_sb, ts_sh,
        HEADS: tl.constexpr, KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, KEY_WIDTH: tl.constexpr, VALUE_WIDTH: tl.constexpr,
        HAS_SCORES: tl.constexpr, ADMIT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per (row, head): the slot holding `oldest` leaves the tail, whose slot `last` takes its place; the leaving slot goes
        to the destination's slot 0 (a slot of its own), or with `ADMIT` in place of the destination store's lowest-scored
        of its `length` slots, if it scores higher."""
        program = tl.program_id(0).to(tl.int64)
        row, head = program // HEADS, program % HEADS
        ids = ids_ptr + row * i_sb + head * i_sh
        where = last + 1  # past every slot: not found yet
        for first in range(0, last + 1, BLOCK):
            s = first + tl.arange(0, BLOCK)
            found = tl.load(ids + s, mask=s <= last, other=-1) == oldest
            where = tl.minimum(where, tl.min(tl.where(found, s, last + 1)))
        where = tl.where(where > last, 0, where)
        to_scores = to_scores_ptr + row * ts_sb + head * ts_sh
        at, taken = 0, True
        if ADMIT:
            at, lowest = _lowest_scored(to_scores, length, BLOCK)
            taken = (at >= 0) & (tl.load(scores_ptr + row * s_sb + head * s_sh + where) > lowest)
        _move_slot(k_ptr + row * k_sb + head * k_sh, k_ss, where, last, to_k_ptr + row * tk_sb + head * tk_sh + at * tk_ss, taken, KEY_DIM, KEY_WIDTH)
        _move_slot(v_ptr + row * v_sb + head * v_sh, v_ss, where, last, to_v_ptr + row * tv_sb + head * tv_sh + at * tv_ss, taken, VALUE_DIM, VALUE_WIDTH)
        _move_slot(ids, 1, where, last, to_ids_ptr + row * ti_sb + head * ti_sh + at, taken, 1, 1)
        if HAS_SCORES:
            _move_slot(scores_ptr + row * s_sb + head * s_sh, 1, where, last, to_scores + at, taken, 1, 1)

    @triton.jit
    def _move_slot(part, slot_stride, where, last, to, taken, DIM: tl.constexpr, WIDTH: tl.constexpr):
        """Copy slot `where` of a (row, head) to `to` if `taken`, then slot `last` into slot `where` (a no-op when they are one)."""
        d = tl.arange(0, WIDTH)
        inside = d < DIM
        leaving = tl.load(part + where * slot_stride + d, mask=inside)
        moving = tl.load(part + last * slot_stride + d, mask=inside)
        tl.store(to + d, leaving, mask=tl.where(taken, inside, False))
        tl.store(part + where * slot_stride + d, moving, mask=inside)

    @triton.jit
    def _lowest_scored(scores, length, BLOCK: tl.constexpr):
        """The latest of the lowest-scored of a (row, head)'s `length` slots (-1 when it has none) and its score."""
        lowest, at = float("inf"), -1
        for first in range(0, length, BLOCK):
            s = first + tl.arange(0, BLOCK)
            inside = s < length
            block = tl.load(scores + s, mask=inside, other=float("inf"))
            block_lowest = tl.min(block)
            block_at = tl.max(tl.where(inside & (block == block_lowest), s, -1))
            at = tl.where(block_lowest < lowest, block_at, tl.where(block_lowest == lowest, tl.maximum(at, block_at), at))
            lowest = tl.minimum(lowest, block_lowest)
        return at, lowest

"""Triton kernels for a decode step that must also say how much attention each slot got (H2O).

A policy that scores its tokens by the attention they receive (`KeepPolicy.needs_attention`) cannot
use a fused attention kernel: those never hand the probabilities out. Computing them apart (logits
by one batched product, a float32 softmax, values by a second product) reads the keys, then writes
and reads the scores twice more, through batched products whose shapes (4 query rows against
thousands of slots) cuBLAS serves badly: on an H200 they were 75% of H2O's decode time. The first
kernel reads the keys and values once, per (row, KV head) and span of slots, with the query heads of
the KV head packed as rows: it writes the partial softmax of the span and the raw logits, 4 bytes per
slot and query row against the 2 x head_dim x 2 bytes of the slot's key and value. The second, per
(row, KV head), merges the spans, writes the output in the model's dtype and sums each slot's
probabilities over the rows: what took some ten small PyTorch operations per layer and step, whose
launches bound H2O's step on a GPU (the host's CPU, not the GPU, sets its pace).

Like `kvcompress.latent_attention` they need CUDA and Triton, or Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``), which is how the CPU tests check them.
"""

from __future__ import annotations

import torch

from .latent_attention import available, dot_width, launch_fitting, on_device_of, slot_strides, spans_of, triton

if triton is not None:
    import triton.language as tl

    from .latent_attention import no_slots_yet, online_softmax, store_partial

BLOCK_SLOTS = 64  # slots per inner step, at most (`launch_fitting`: wide heads in float32 take half)
FINISH_BLOCK_SLOTS = 256  # slots per inner step of the merge (logits only: no keys or values)
MOST_ROWS = 64  # query rows per KV head the kernel takes (the query heads of a KV head, for the one new token)

__all__ = ["available", "attend_and_score", "MOST_ROWS"]


def attend_and_score(queries, keys, values, token_ids, bias, new_seen, scaling):
    """Attention of one new token's query rows over a table of slots, and the attention each slot received.

    `queries` ``[B, H, R, D]`` (the query rows of each KV head); `keys`/`values` ``[B, H, S, D]``
    (any strides with contiguous last dimension), the new token's in the last slot; `token_ids`
    ``[B, H, S]`` (-1: filler, masked; synthesized slots, -2, are seen like any other); `bias`
    ``[B, H, S_b]`` or None: an additive logit bias of the first `S_b` slots; `new_seen`
    ``[B or 1]`` bool: whether the new token sees itself (not when it is padding, whose attention
    then counts for no slot). Returns ``(output [B, H, R, D] in the queries' dtype, received [B, H, S]
    in float32)``: `received` sums each slot's probability over the rows.
    """
    queries = queries.contiguous()
    batch, heads, rows, dim = queries.shape
    slots = keys.shape[2]
    tile = dot_width(rows)
    span, spans = spans_of(slots, BLOCK_SLOTS, batch * heads)
    maxima = torch.empty(batch * heads, spans, tile, device=queries.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    weighted = torch.empty(batch * heads, spans, tile, dim, device=queries.device, dtype=torch.float32)
    logits = torch.empty(batch, heads, rows, slots, device=queries.device, dtype=torch.float32)
    output = torch.empty_like(queries)
    received = torch.empty(batch, heads, slots, device=queries.device, dtype=torch.float32)
    k_strides, v_strides, ids_strides = (slot_strides(t) for t in (keys, values, token_ids))
    bias_strides = slot_strides(bias) if bias is not None else (0, 0, 0, 1)
    new_seen_step = new_seen.stride(0) if new_seen.shape[0] > 1 else 0
    def launch(block: int) -> None:
        _scored_partials_kernel[(batch * heads, spans)](
            queries, keys, values, token_ids, token_ids if bias is None else bias, new_seen, new_seen_step, maxima, sums, weighted, logits,
            rows, slots, span, scaling, 0 if bias is None else bias.shape[2],
            *queries.stride()[:3], *k_strides[:3], *v_strides[:3], *ids_strides[:3], *bias_strides[:3],
            K_ALIGN=k_strides[3], V_ALIGN=v_strides[3], IDS_ALIGN=ids_strides[3],
            HEADS=heads, DIM=dim, TILE=tile, BLOCK=block, HAS_BIAS=bias is not None,
            PRECISION="ieee" if queries.dtype == torch.float32 else "tf32", num_warps=4,
        )

    launch_fitting(queries, ("scored", queries.device, queries.dtype, dim, tile), BLOCK_SLOTS, launch)
    with on_device_of(queries):
        _finish_kernel[(batch * heads,)](
            maxima, sums, weighted, logits, new_seen, new_seen_step, output, received, rows, slots, spans,
            HEADS=heads, DIM=dim, TILE=tile, BLOCK=FINISH_BLOCK_SLOTS, num_warps=4,
        )
    return output, received


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "slots", "k_sb", "k_sh", "v_sb", "v_sh", "ids_sb", "ids_sh", "b_sb", "b_sh", "bias_slots", "new_seen_step"])
    def _scored_partials_kernel(
        q_ptr, k_ptr, v_ptr, ids_ptr, bias_ptr, new_seen_ptr, new_seen_step, max_ptr, sum_ptr, acc_ptr, logit_ptr,
        rows, slots, span, scaling, bias_slots,
        q_sb, q_sh, q_sr, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, ids_sb, ids_sh, ids_ss, b_sb, b_sh, b_ss,
        K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, IDS_ALIGN: tl.constexpr,
        HEADS: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        program, part = tl.program_id(0).to(tl.int64), tl.program_id(1)  # 64-bit offsets: a table or the logits may pass 2**31 numbers
        row, head = program // HEADS, program % HEADS
        r, d = tl.arange(0, TILE), tl.arange(0, DIM)
        q = tl.load(q_ptr + row * q_sb + head * q_sh + r[:, None] * q_sr + d[None, :], mask=r[:, None] < rows, other=0.0)
        k_row = tl.multiple_of(row * k_sb + head * k_sh, K_ALIGN)
        v_row = tl.multiple_of(row * v_sb + head * v_sh, V_ALIGN)
        ids_row = tl.multiple_of(row * ids_sb + head * ids_sh, IDS_ALIGN)
        logit_rows = logit_ptr + (program * rows + r[:, None]) * slots
        new_seen = tl.load(new_seen_ptr + row * new_seen_step)

        top, total, acc = no_slots_yet(TILE, DIM)
        start, end = part * span, tl.minimum(part * span + span, slots)  # this program's span of slots
        for first in range(start, end, BLOCK):
            s = first + tl.arange(0, BLOCK)
            inside = s < end
            logits, v = exact_block(q, k_ptr + k_row, k_ss, v_ptr + v_row, v_ss, ids_ptr + ids_row, ids_ss, s, inside, slots, new_seen, scaling, d, PRECISION)
            if HAS_BIAS:  # after the mask: a masked logit stays -inf
                logits += tl.load(bias_ptr + row * b_sb + head * b_sh + s * b_ss, mask=s < bias_slots, other=0.0).to(tl.float32)[None, :]
            tl.store(logit_rows + s[None, :], logits, mask=(r[:, None] < rows) & inside[None, :])
            top, total, acc = online_softmax(logits, v, top, total, acc, PRECISION)
        store_partial(max_ptr, sum_ptr, acc_ptr, (program * tl.num_programs(1) + part) * TILE + r, d, top, total, acc)

    @triton.jit
    def exact_block(q, k_ptr, k_ss, v_ptr, v_ss, ids_ptr, ids_ss, s, inside, slots, new_seen, scaling, d, PRECISION: tl.constexpr):
        """The logits of query rows `q` over a block `s` of a (row, KV head)'s exact slots ``[rows, BLOCK]`` and the block's values
        ``[BLOCK, D]``. Masked (-inf): fillers (-1) and, unless `new_seen`, the new token in the last slot; synthesized slots
        (-2) are seen."""
        k = tl.load(k_ptr + s[:, None] * k_ss + d[None, :], mask=inside[:, None], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scaling
        position = tl.load(ids_ptr + s * ids_ss, mask=inside, other=-1)
        seen = (position != -1) & ((s < slots - 1) | new_seen)
        v = tl.load(v_ptr + s[:, None] * v_ss + d[None, :], mask=inside[:, None], other=0.0)
        return tl.where(seen[None, :], logits, float("-inf")), v

    @triton.jit(do_not_specialize=["new_seen_step", "rows", "slots", "spans"])
    def _finish_kernel(
        max_ptr, sum_ptr, acc_ptr, logit_ptr, new_seen_ptr, new_seen_step, out_ptr, received_ptr, rows, slots, spans,
        HEADS: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per (row, KV head): merge the spans' partial softmaxes (`kvcompress.softmax.merge_softmax`), write the normalized
        output, and each slot's probability summed over the query rows (none for a padding token, which does not see itself)."""
        program = tl.program_id(0).to(tl.int64)
        r, d = tl.arange(0, TILE), tl.arange(0, DIM)
        parts = program * spans * TILE + r  # the first span's partial of each row
        top, total, acc = no_slots_yet(TILE, DIM)
        for part in range(spans):
            top = tl.maximum(top, tl.load(max_ptr + parts + part * TILE))
        for part in range(spans):
            at = parts + part * TILE
            weight = tl.exp(tl.load(max_ptr + at) - top)
            total += tl.load(sum_ptr + at) * weight
            acc += tl.load(acc_ptr + at[:, None] * DIM + d[None, :]) * weight[:, None]
        total = tl.maximum(total, 1.1754943508222875e-38)  # a row that sees no slot gets zeros
        real = r < rows
        tl.store(out_ptr + (program * rows + r[:, None]) * DIM + d[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=real[:, None])
        counted = tl.load(new_seen_ptr + program // HEADS * new_seen_step).to(tl.float32)
        scale = tl.where(real, counted / total, 0.0)
        logit_rows = logit_ptr + (program * rows + r[:, None]) * slots
        for first in range(0, slots, BLOCK):
            s = first + tl.arange(0, BLOCK)
            inside = s < slots
            logits = tl.load(logit_rows + s[None, :], mask=real[:, None] & inside[None, :], other=float("-inf"))
            tl.store(received_ptr + program * slots + s, tl.sum(tl.exp(logits - top[:, None]) * scale[:, None], 0), mask=inside)

"""A Triton kernel for the end of a decode step over a store read in its own form: the exact tail, merged in.

A cache whose encoding attends its store as it is (`Encoding.attends_store`: low-rank latents) gets
the store's partial softmax from the encoding and must still attend its exact tail (sink and recent
window) and merge the two. In PyTorch that is some 25 small operations per layer and step (the
tail's logits and mask, a partial softmax, the merge through the maxima, the division); at batch 64
on an H200 their Python side, not the GPU, set the step's time (cProfile: 1.1 ms per layer for PCA,
with the GPU idle). For one new token this kernel does it in one launch: per (row, KV head) it
starts from the store's partial, folds in the tail's slots block by block (online softmax), and
writes the normalized output.

Like `kvcompress.latent_attention` it needs CUDA and Triton, or Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``), which is how the CPU tests check it.
"""

from __future__ import annotations

import torch

from . import latent_attention
from .latent_attention import dot_width, slot_strides, triton

if triton is not None:
    import triton.language as tl

    from .latent_attention import online_softmax
    from .scored_attention import exact_block

BLOCK_SLOTS = 64  # tail slots per inner step, at most (`launch_fitting`); a tail is the sink, the window and up to a block: about a hundred


def available(query: torch.Tensor) -> bool:
    """Whether the kernel runs for this query (as `kvcompress.latent_attention.available`, looked up at each call)."""
    return latent_attention.available(query)


def attend_tail(queries, keys, values, token_ids, new_seen, store_part, scaling) -> torch.Tensor:
    """Attention output ``[B, H, R, D]`` (in the queries' dtype) of one new token's query rows over a store and the tail.

    `queries` ``[B, H, R, D]`` (the query rows of each KV head; any strides, the last contiguous);
    `keys`/`values`/`token_ids` the tail's ``[B, H, T, D]`` / ``[B, H, T]`` (-1: filler), the new
    token's in the last slot; `new_seen` ``[B or 1]`` bool: whether the new token sees itself;
    `store_part` the store's partial softmax ``(max [B, H, R], sum [B, H, R], weighted values [B,
    H, R, D])`` as `kvcompress.softmax.merge_softmax` takes it.
    """
    batch, heads, rows, dim = queries.shape
    top, total, weighted = (part.float().contiguous() for part in store_part)
    output = torch.empty(batch, heads, rows, dim, device=queries.device, dtype=queries.dtype)
    k_strides, v_strides, ids_strides = (slot_strides(t) for t in (keys, values, token_ids))
    tile = dot_width(rows)

    def launch(block: int) -> None:
        _tail_kernel[(batch * heads,)](
            queries, keys, values, token_ids, new_seen, new_seen.stride(0) if new_seen.shape[0] > 1 else 0, top, total, weighted, output,
            rows, keys.shape[2], scaling,
            *queries.stride()[:3], *k_strides[:3], *v_strides[:3], *ids_strides[:3],
            K_ALIGN=k_strides[3], V_ALIGN=v_strides[3], IDS_ALIGN=ids_strides[3],
            HEADS=heads, DIM=dim, TILE=tile, BLOCK=block, PRECISION="ieee" if queries.dtype == torch.float32 else "tf32", num_warps=4,
        )

    latent_attention.launch_fitting(queries, ("tail", queries.device, queries.dtype, dim, tile), BLOCK_SLOTS, launch)
    return output


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "slots", "k_sb", "k_sh", "v_sb", "v_sh", "ids_sb", "ids_sh", "new_seen_step"])
    def _tail_kernel(
        q_ptr, k_ptr, v_ptr, ids_ptr, new_seen_ptr, new_seen_step, top_ptr, total_ptr, acc_ptr, out_ptr,
        rows, slots, scaling,
        q_sb, q_sh, q_sr, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, ids_sb, ids_sh, ids_ss,
        K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, IDS_ALIGN: tl.constexpr,
        HEADS: tl.constexpr, DIM: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    ):
        program = tl.program_id(0).to(tl.int64)
        row, head = program // HEADS, program % HEADS
        r, d = tl.arange(0, TILE), tl.arange(0, DIM)
        on = r < rows
        q = tl.load(q_ptr + row * q_sb + head * q_sh + r[:, None] * q_sr + d[None, :], mask=on[:, None], other=0.0)
        k_row = tl.multiple_of(row * k_sb + head * k_sh, K_ALIGN)
        v_row = tl.multiple_of(row * v_sb + head * v_sh, V_ALIGN)
        ids_row = tl.multiple_of(row * ids_sb + head * ids_sh, IDS_ALIGN)
        new_seen = tl.load(new_seen_ptr + row * new_seen_step)
        part = program * rows + r  # this program's rows of the store's partial and of the output
        top = tl.load(top_ptr + part, mask=on, other=-1.0e30)  # finite, as the store's maxima are
        total = tl.load(total_ptr + part, mask=on, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * DIM + d[None, :], mask=on[:, None], other=0.0)
        for first in range(0, slots, BLOCK):
            s = first + tl.arange(0, BLOCK)
            inside = s < slots
            logits, v = exact_block(q, k_ptr + k_row, k_ss, v_ptr + v_row, v_ss, ids_ptr + ids_row, ids_ss, s, inside, slots, new_seen, scaling, d, PRECISION)
            top, total, acc = online_softmax(logits, v, top, total, acc, PRECISION)
        output = acc / tl.maximum(total, 1.1754943508222875e-38)[:, None]  # float32's smallest normal: a row that sees nothing stays 0
        tl.store(out_ptr + part[:, None] * DIM + d[None, :], output.to(out_ptr.dtype.element_ty), mask=on[:, None])

"""A Triton kernel for attention over a low-rank store, read in latent space.

Decoding every latent to full keys and values before attention writes and reads back far more
bytes than the store holds: a rank-16 store of 8:1 at 8x the batch moves 8x a dense cache's bytes
per step. This kernel reads only the latents (as floats, or as `kvcompress.quantize`'s int8/int4
with their scales, de-quantized on chip). Per (row, KV head), span of store slots and tile of 16
query rows it decodes a block of key latents on chip (``latents @ decoder + bias``), applies RoPE
at the slots' token ids (keys are stored before RoPE, so the decoder cannot be folded into the
query), scores the query rows against them with an online softmax, and sums the softmax weights
times the *value latents*: values are mixed in latent space and decoded once per query afterwards
(`LowRankCompressor.attend_store`). The caller merges the partial softmaxes of the spans and of
the exact tail through their maxima (`kvcompress.softmax.merge_softmax`).

`store_partials` needs CUDA and Triton (a CUDA build of torch ships it). It also runs on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests check it.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .quantize import Quantized
from .softmax import merge_softmax

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # a CPU-only torch: the low-rank caches use their PyTorch path
    triton = None

BLOCK_SLOTS = 128  # store slots per inner step, at most: wide ranks take half (or less) where shared memory runs out
PROGRAMS_WANTED = 512  # programs per call at least (row x head x tile x span), so a small batch still fills the GPU: about 2 waves of an H200 (1024 measured the same)
NUM_WARPS = 4  # measured on an H100 for the Llama-3.1-8B shape: 4 warps and 128 slots beat 8 warps and 32 or 64 slots
ROW_TILE = 16  # query rows per program: tl.dot's smallest
_FITTING_BLOCK = {}  # (kernel, device, dtype, widths...) -> the block of slots that fitted in shared memory (`launch_fitting`)


def available(queries: torch.Tensor) -> bool:
    """Whether the kernel can run for these queries: Triton present, a GPU (or the interpreter), a power-of-two head_dim >= 32."""
    head_dim = queries.shape[-1]
    return head_dim >= 32 and not head_dim & (head_dim - 1) and triton_runs_on(queries)


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels can run on this tensor's device: Triton present, and a GPU or Triton's interpreter."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"))


def on_device_of(tensor: torch.Tensor):
    """The context in which to launch a Triton kernel on `tensor`: its GPU made the current one. Triton launches on the
    current device, which under a model split across GPUs (accelerate's device_map) is not every layer's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def dot_width(columns: int) -> int:
    """The tile dimension that holds `columns`: tl.dot wants power-of-two dimensions of at least 16."""
    return max(16, 1 << (columns - 1).bit_length())


def whole_rows(rank: int) -> bool:
    """Whether `rank` columns per head are whole rows of the kernel's width (heads side by side then need no window)."""
    return dot_width(rank) == rank


def _source(latents) -> tuple:
    """(data, scale, bits, group size) of float or `Quantized` latents; the scale is a stand-in when there is none."""
    if isinstance(latents, Quantized):
        return latents.q, latents.scale, latents.bits, latents.group_size
    return latents, latents, 0, 1


TABLE, WINDOWS = -1, -2  # column steps that are not whole rows: each column read on its own, or an aligned window per head


def aligned_windows(ranks: list[int]) -> tuple[list[int], int] | None:
    """Where the kernel reads each head's latents in the shared layout (heads side by side, `ranks` columns each) so that
    its loads are vectors: (the first column of each head's window, the windows' width). A window starts at an even
    column and holds the head's columns (its decoder rows go at their offset in it); a window that would run past the
    row's end ends with it. None where the row is odd or narrower than a window: the kernel reads column by column.

    Odd starts (heads of rank 15 side by side) made every load a 2-byte one, 1.4x the kernel's time on an H200.
    """
    starts = [sum(ranks[:head]) for head in range(len(ranks))]
    row = sum(ranks)
    width = dot_width(max(rank + start % 2 for start, rank in zip(starts, ranks)))
    if row % 2 or row < width:
        return None
    return [min(start - start % 2, row - width) for start in starts], width


def _column_step(columns: tuple, rank: int, bits: int, group: int) -> int:
    """The column step from one head's latents to the next's when each head's are whole rows of the kernel's width
    (read by vector loads, with no mask on columns; quantized ones in whole groups); else `WINDOWS` for float latents
    read through aligned windows, or `TABLE` (each column read on its own, where the table says)."""
    _, step = columns
    groups = rank // group
    if step == WINDOWS:
        return WINDOWS if not bits else TABLE
    if step is None or not whole_rows(rank) or (bits and (rank % group or groups & (groups - 1))):
        return TABLE
    return step


def spans_of(slots: int, block: int, programs: int) -> tuple[int, int]:
    """(span, spans): slots per program, a whole number of blocks, and how many programs, so that at least
    `PROGRAMS_WANTED` run where there are enough slots (`programs`: the programs per span, from the other grid axes)."""
    spans = max(1, min(math.ceil(slots / block), math.ceil(PROGRAMS_WANTED / programs)))
    span = math.ceil(slots / spans / block) * block
    return span, math.ceil(slots / span)


def slot_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a store tensor ``[B, 1 or H, S, ...]`` (row, head, slot; the head's 0 when one layout serves every
    head), and the largest power of two up to 16 that divides all three.

    The row and head strides change with the store's capacity, so the kernel is not specialized on
    them (Triton would compile it anew for each new divisibility by 16, which compressions keep
    bringing: a second or more, in the middle of decoding). They are multiples of the slot stride,
    so the power of two does not change with the capacity; it tells the kernel how aligned each
    (row, head)'s slots are, so that it still loads them as vectors.
    """
    head_stride = t.stride(1) if t.shape[1] > 1 else 0
    common = math.gcd(t.stride(0), head_stride, t.stride(2))
    return t.stride(0), head_stride, t.stride(2), min(16, common & -common)


def store_partials(queries, key_latents, value_latents, token_ids, key_decoder, key_bias, key_columns, value_columns, value_width, inv_freq, scaling):
    """Partial softmax of query rows over a low-rank store.

    `queries` ``[B, H, R, D]`` (the query rows of each KV head: its query heads, times the new
    tokens); latents ``[B, 1 or H, S, C]``, floats or `Quantized`; `token_ids` ``[B, H, S]`` (-1:
    filler, masked); `key_decoder` ``[H, R_k, D]`` and `key_bias` ``[H, 1, D]``;
    `key_columns`/`value_columns`: where each head's latents sit in the last dimension
    (`AffineProjection.kernel_layout`'s table and step); `value_width` the rows of the value
    decoder that the returned latents go with. Returns ``(max [B, H, R], sum [B, H, R], latents
    [B, H, R, value_width])`` in float32, the weights taken relative to `max`.
    """
    queries = queries.contiguous()
    batch, heads, rows, dim = queries.shape
    slots = token_ids.shape[2]
    (zk, zk_scale, key_bits, key_group), (zv, zv_scale, value_bits, value_group) = _source(key_latents), _source(value_latents)
    key_padded, value_padded = dot_width(key_decoder.shape[1]), dot_width(value_width)
    key_step, value_step = _column_step(key_columns, key_decoder.shape[1], key_bits, key_group), _column_step(value_columns, value_width, value_bits, value_group)
    tiles = math.ceil(rows / ROW_TILE)
    span, spans = spans_of(slots, BLOCK_SLOTS, batch * heads * tiles)
    maxima = torch.empty(batch * heads, spans, tiles * ROW_TILE, device=queries.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    latents = torch.empty(batch * heads, spans, tiles * ROW_TILE, value_padded, device=queries.device, dtype=torch.float32)
    zk_strides, zks_strides, zv_strides, zvs_strides, ids_strides = (slot_strides(t) for t in (zk, zk_scale, zv, zv_scale, token_ids))
    shape_key = ("store", queries.device, queries.dtype, dim, key_padded, value_padded, key_bits, value_bits)

    def launch(block: int) -> None:
        _store_partials_kernel[(batch * heads, spans, tiles)](
            queries, zk, zk_scale, zv, zv_scale, token_ids, key_decoder, key_bias, inv_freq, key_columns[0], value_columns[0], maxima, sums, latents,
            rows, slots, span, scaling, key_decoder.shape[1],
            *queries.stride()[:3], *zk_strides[:3], *zks_strides[:3], *zv_strides[:3], *zvs_strides[:3], *ids_strides[:3], key_decoder.stride(0), key_decoder.stride(1),
            ZK_ALIGN=zk_strides[3], ZKS_ALIGN=zks_strides[3], ZV_ALIGN=zv_strides[3], ZVS_ALIGN=zvs_strides[3], IDS_ALIGN=ids_strides[3],
            HEADS=heads, HALF=dim // 2, KEY_WIDTH=key_padded, VALUE_WIDTH=value_padded, BLOCK=block, TILE=ROW_TILE,
            KEY_BITS=key_bits, KEY_GROUP=key_group, VALUE_BITS=value_bits, VALUE_GROUP=value_group, KEY_STEP=key_step, VALUE_STEP=value_step,
            PRECISION="ieee" if queries.dtype == torch.float32 else "tf32",  # float32 models get float32 products, not TF32's
            FAST_TRIG=queries.is_cuda, num_warps=NUM_WARPS,
        )

    launch_fitting(queries, shape_key, BLOCK_SLOTS, launch)  # near-full ranks of a 128-dim head: 128 slots need more shared memory than an H200 has
    return merge_spans(maxima, sums, latents, (batch, heads, rows), value_width)


def launch_fitting(tensor: torch.Tensor, shape_key: tuple, block: int, launch) -> None:
    """`launch(block)` on `tensor`'s GPU with the largest block of slots, `block` or a half of it down to `ROW_TILE`,
    whose kernel fits in shared memory; the block that fitted is remembered per `shape_key`. Wide heads in float32 (head_dim
    256: Gemma's) or near-full ranks need more than an H200 has at the kernels' usual blocks. Triton raises before the
    kernel runs, so nothing is half-written; spans of slots are whole multiples of the usual block, so of every half too."""
    block = _FITTING_BLOCK.get(shape_key, block)
    while True:
        try:
            with on_device_of(tensor):
                launch(block)
            break
        except OutOfResources:
            if block == ROW_TILE:
                raise
            block //= 2
    _FITTING_BLOCK[shape_key] = block


def merge_spans(maxima: torch.Tensor, sums: torch.Tensor, values: torch.Tensor, shape: tuple, width: int) -> tuple:
    """A kernel's partial softmaxes per span (``[programs, spans, tile rows]``, values ``[..., padded width]``) merged into
    one per query row: ``(max, sum) [*shape]`` and values ``[*shape, width]``. One span is only cut to its rows: the
    merge's launches cost a CPU-bound decode step more than they do on the GPU."""
    rows = shape[-1]
    if maxima.shape[1] == 1:
        return maxima[:, 0, :rows].reshape(shape), sums[:, 0, :rows].reshape(shape), values[:, 0, :rows, :width].reshape(*shape, width)
    top, total, merged = merge_softmax(maxima[..., :rows], sums[..., :rows], values[:, :, :rows, :width], dim=1)
    return top.view(shape), total.view(shape), merged.view(*shape, width)


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "slots", "zk_sb", "zk_sh", "zks_sb", "zks_sh", "zv_sb", "zv_sh", "zvs_sb", "zvs_sh", "ids_sb", "ids_sh"])
    def _store_partials_kernel(
        q_ptr, zk_ptr, zk_scale_ptr, zv_ptr, zv_scale_ptr, ids_ptr, dec_ptr, bias_ptr, freq_ptr, kcol_ptr, vcol_ptr, max_ptr, sum_ptr, acc_ptr,
        rows, slots, span, scaling, dec_rows,
        q_sb, q_sh, q_sr,
        zk_sb, zk_sh, zk_ss, zks_sb, zks_sh, zks_ss,
        zv_sb, zv_sh, zv_ss, zvs_sb, zvs_sh, zvs_ss,
        ids_sb, ids_sh, ids_ss,
        dec_sh, dec_sr,
        ZK_ALIGN: tl.constexpr, ZKS_ALIGN: tl.constexpr, ZV_ALIGN: tl.constexpr, ZVS_ALIGN: tl.constexpr, IDS_ALIGN: tl.constexpr,
        HEADS: tl.constexpr, HALF: tl.constexpr, KEY_WIDTH: tl.constexpr, VALUE_WIDTH: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
        KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr, KEY_STEP: tl.constexpr, VALUE_STEP: tl.constexpr,
        PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
    ):
        program, part, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # 64-bit offsets: a store may pass 2**31 numbers
        row, head = program // HEADS, program % HEADS
        r, d = tile * TILE + tl.arange(0, TILE), tl.arange(0, HALF)
        rk, rv = tl.arange(0, KEY_WIDTH), tl.arange(0, VALUE_WIDTH)
        q_rows = q_ptr + row * q_sb + head * q_sh + r[:, None] * q_sr
        q_first = tl.load(q_rows + d[None, :], mask=r[:, None] < rows, other=0.0)
        q_second = tl.load(q_rows + HALF + d[None, :], mask=r[:, None] < rows, other=0.0)
        q_first_t, q_second_t = tl.trans(q_first), tl.trans(q_second)
        key_start, key_rank = _columns(kcol_ptr, head, KEY_STEP, KEY_WIDTH)
        value_start, value_rank = _columns(vcol_ptr, head, VALUE_STEP, VALUE_WIDTH)
        decoder = dec_ptr + head * dec_sh + rk[:, None] * dec_sr + d[None, :]
        on_rank = (rk[:, None] < key_rank) & (rk[:, None] < dec_rows)
        dec_first = tl.load(decoder, mask=on_rank, other=0.0)
        dec_second = tl.load(decoder + HALF, mask=on_rank, other=0.0)
        bias_first = tl.load(bias_ptr + head * 2 * HALF + d).to(tl.float32)
        bias_second = tl.load(bias_ptr + head * 2 * HALF + HALF + d).to(tl.float32)
        freq = tl.load(freq_ptr + d).to(tl.float32)

        zk_row, zks_row = tl.multiple_of(row * zk_sb + head * zk_sh, ZK_ALIGN), tl.multiple_of(row * zks_sb + head * zks_sh, ZKS_ALIGN)
        zv_row, zvs_row = tl.multiple_of(row * zv_sb + head * zv_sh, ZV_ALIGN), tl.multiple_of(row * zvs_sb + head * zvs_sh, ZVS_ALIGN)
        ids_row = tl.multiple_of(row * ids_sb + head * ids_sh, IDS_ALIGN)

        top, total, acc = no_slots_yet(TILE, VALUE_WIDTH)
        start, end = part * span, tl.minimum(part * span + span, slots)  # this program's span of slots
        for first in range(start, end, BLOCK):  # slot strides are multiples of the ALIGNs: written so, the compiler loads vectors
            s = first + tl.arange(0, BLOCK)
            inside = s < end
            zk = _load_latents(zk_ptr, zk_scale_ptr, zk_row + s * (zk_ss // ZK_ALIGN) * ZK_ALIGN, zks_row + s * zks_ss,
                               inside, key_start, key_rank, KEY_WIDTH, KEY_STEP, KEY_BITS, KEY_GROUP, q_first.dtype)
            k_first = tl.dot(zk, dec_first, input_precision=PRECISION).to(tl.float32) + bias_first[None, :]
            k_second = tl.dot(zk, dec_second, input_precision=PRECISION).to(tl.float32) + bias_second[None, :]
            position = tl.load(ids_ptr + ids_row + s * ids_ss, mask=inside, other=-1)
            cos, sin = _cos_sin(position.to(tl.float32)[:, None] * freq[None, :], FAST_TRIG)
            rotated_first = (k_first * cos - k_second * sin).to(q_first.dtype)  # RoPE, as transformers' rotate_half does it
            rotated_second = (k_second * cos + k_first * sin).to(q_first.dtype)
            logits = tl.dot(rotated_first, q_first_t, input_precision=PRECISION)  # slots as the product's rows: the keys stay in registers
            logits = tl.trans((logits + tl.dot(rotated_second, q_second_t, input_precision=PRECISION)).to(tl.float32) * scaling)
            logits = tl.where((position >= 0)[None, :], logits, float("-inf"))
            zv = _load_latents(zv_ptr, zv_scale_ptr, zv_row + s * (zv_ss // ZV_ALIGN) * ZV_ALIGN, zvs_row + s * zvs_ss,
                               inside, value_start, value_rank, VALUE_WIDTH, VALUE_STEP, VALUE_BITS, VALUE_GROUP, q_first.dtype)
            top, total, acc = online_softmax(logits, zv, top, total, acc, PRECISION)
        store_partial(max_ptr, sum_ptr, acc_ptr, (program * tl.num_programs(1) + part) * tl.num_programs(2) * TILE + r, rv, top, total, acc)

    @triton.jit
    def no_slots_yet(TILE: tl.constexpr, WIDTH: tl.constexpr):
        """The running maximum, sum of weights and weighted values of `TILE` rows before any slot; the maximum is finite,
        so that a span of fillers only does not give inf - inf."""
        return tl.full([TILE], -1.0e30, tl.float32), tl.zeros([TILE], tl.float32), tl.zeros([TILE, WIDTH], tl.float32)

    @triton.jit
    def online_softmax(logits, values, top, total, acc, PRECISION: tl.constexpr):
        """Fold a block of `logits` ``[rows, slots]`` (-inf: masked) and its `values` ``[slots, width]`` into the running
        maximum, sum of weights and weighted values of the rows (flash attention's online softmax)."""
        new_top = tl.maximum(top, tl.max(logits, 1))
        weights = tl.exp(logits - new_top[:, None])
        shrink = tl.exp(top - new_top)
        acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values, input_precision=PRECISION).to(tl.float32)
        return new_top, total * shrink + tl.sum(weights, 1), acc

    @triton.jit
    def store_partial(max_ptr, sum_ptr, acc_ptr, out, columns, top, total, acc):
        """Write a span's partial softmax for the rows `out` (`merge_softmax` merges the spans)."""
        tl.store(max_ptr + out, top)
        tl.store(sum_ptr + out, total)
        tl.store(acc_ptr + out[:, None] * columns.shape[0] + columns[None, :], acc)

    @triton.jit
    def _columns(table_ptr, head, STEP: tl.constexpr, WIDTH: tl.constexpr):
        """Where a head's latents start and how many there are: from the column table, or from `STEP` when every head's are whole rows."""
        if STEP >= 0:
            start, count = head * STEP, WIDTH
        else:
            start, count = tl.load(table_ptr + 2 * head), tl.load(table_ptr + 2 * head + 1)
        return start, count

    @triton.jit
    def _load_latents(ptr, scale_ptr, offsets, scale_offsets, inside, start, rank, WIDTH: tl.constexpr, STEP: tl.constexpr,
                      BITS: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr):
        """A block of latents ``[slots, WIDTH]`` in `dtype`: as stored (BITS 0), or de-quantized as `kvcompress.quantize.dequantize` does.

        `STEP` >= 0: the head's latents are whole rows of `WIDTH` (in whole groups): the loads are vectors
        masked by slot only, and each byte of int4 and each scale is read once. -2 (`WINDOWS`, floats only):
        `WIDTH` columns from an even `start` (`aligned_windows`), vectors too. -1: every number is read on
        its own, masked by column too.
        """
        columns = ((start // 2) * 2 if STEP == -2 else start) + tl.arange(0, WIDTH)  # windows start even: said so the compiler sees it
        mask = inside[:, None] if STEP != -1 else inside[:, None] & (tl.arange(0, WIDTH) < rank)[None, :]
        if BITS == 0:
            latents = tl.load(ptr + offsets[:, None] + columns[None, :], mask=mask, other=0.0)
        else:
            if BITS == 8:
                numbers = tl.load(ptr + offsets[:, None] + columns[None, :], mask=mask, other=0).to(tl.float32)
            elif STEP >= 0:  # two a byte, low nibble first, offset by 8: each byte read once and split
                packed = tl.load(ptr + offsets[:, None] + (start // 2 + tl.arange(0, WIDTH // 2))[None, :], mask=mask, other=0)
                numbers = tl.interleave(packed & 15, packed >> 4).to(tl.float32) - 8.0
            else:
                packed = tl.load(ptr + offsets[:, None] + columns[None, :] // 2, mask=mask, other=0).to(tl.int32)
                numbers = (tl.where(columns[None, :] % 2 == 0, packed & 15, packed >> 4) - 8).to(tl.float32)
            if STEP >= 0:  # one scale per group, read once
                groups = start // GROUP + tl.arange(0, WIDTH // GROUP)
                scale = tl.load(scale_ptr + scale_offsets[:, None] + groups[None, :], mask=mask, other=0.0).to(tl.float32)
                numbers = tl.reshape(numbers, [offsets.shape[0], WIDTH // GROUP, GROUP]) * scale[:, :, None]
                latents = tl.reshape(numbers, [offsets.shape[0], WIDTH]).to(dtype)
            else:
                scale = tl.load(scale_ptr + scale_offsets[:, None] + columns[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
                latents = (numbers * scale).to(dtype)
        return latents

    @triton.jit
    def _cos_sin(angle, FAST: tl.constexpr):
        """cos and sin of float32 angles (up to millions of radians at long contexts).

        `FAST` (CUDA): the angle is reduced to [-pi, pi] exactly enough (2 pi in two parts, fused
        multiply-adds), then the hardware's approximate sin and cos (error ~1e-6) take it; libdevice's
        accurate ones took twice as long as the whole kernel does with these. The whole turns are rounded by
        adding and taking away 1.5 * 2**23, exact below 2**22 turns (26M radians, past any context a cache
        holds): `floor` is a conversion, on a slower pipe than the multiply-adds, and cost the kernel 11-15% of
        its time at ranks 15 and 16 (H200).
        """
        if FAST:
            turns = tl.fma(angle, 0.15915494309189535, 12582912.0) - 12582912.0
            reduced = tl.fma(turns, -6.2831854820251465, angle)  # 2 pi = 6.2831854820251465 - 1.7484556e-07
            reduced = tl.fma(turns, 1.7484556000744487e-07, reduced)
            cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [reduced], dtype=tl.float32, is_pure=True, pack=1)
            sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [reduced], dtype=tl.float32, is_pure=True, pack=1)
            return cos, sin
        return tl.cos(angle), tl.sin(angle)

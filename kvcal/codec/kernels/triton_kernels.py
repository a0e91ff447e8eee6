"""The Triton kernels themselves (imported only when ``triton`` is; see ``kvcal.codec.kernels`` for the dispatch).

``encode_kernel``: un-rotate + centre + project + quantize, one program per ``[BLOCK_M rows, BLOCK_N coordinates]``
tile, looping over the (layer, head) blocks of the PCA group's row. The un-rotation needs each rotary dim's partner
(``rotate_half``), so a head is loaded as its two rotary halves plus the pass-through tail, each its own dot.

``decode_kernel``: dequantize + project back + re-rotate + cast, for one layer of the group, one program per
``[BLOCK_M rows, one head]`` (both rotary halves of a head come out of the same program, so RoPE needs no second
pass), written straight into the layer's cache tensor.

Every elementwise step is the one ``kvcal.codec.transform`` / ``quantize`` and ``ModelAdapter`` do, in the same
order and in float32: launched with ``enable_fp_fusion=False`` (no FMA contraction) and IEEE division, they give
the torch path's values bit for bit. The dots run in IEEE float32 (``PRECISION="ieee"``; ``"tf32"`` only when asked
for, see ``kvcal.codec.kernels.dot_precision``) but sum in another order than the BLAS/cuBLAS the torch path calls,
so coordinates may differ from it in their last bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    # torch.round is round-half-to-even. |v| <= 32767 here (clamped first), so v + 0.5, r - v and r / 2 are exact.
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    tie = (r - v) == 0.5
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _store_cast(ptr, x, mask, OUT_BF16: tl.constexpr):
    """Store float32 ``x`` in the cache dtype, rounding to nearest even as torch's ``.to`` does. bf16 is rounded
    on the bits (exact for finite values), since Triton's interpreter does not round ties to even."""
    if OUT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def encode_kernel(
    src_ptr, s_l, s_b, s_h, s_t,  # [layers, batch, heads, tokens, head_dim] (dim stride 1)
    item_ptr, tok_ptr,  # [N] int32: batch item and token index (into src) of each row
    cos_ptr, sin_ptr,  # [N, ROT] float32 (row-major), RoPE at each row's true position
    mean_ptr,  # [p] float32
    enc_ptr, s_ep, s_ek,  # [p, k] float32 encoder
    step_ptr, bound_ptr,  # [k] float32 step and span (as float32)
    out_ptr, s_on,  # [N, k] int32 codes
    N, K, LAYERS, HEADS,
    D: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    s_l = s_l.to(tl.int64)  # layers * stride may pass 2^31 at 8K x 8 x 32 layers
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cmask = cols < K
    item = tl.load(item_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    row_base = item * s_b + tok * s_t
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROT > 0:
        hd = tl.arange(0, HALF_P)
        hmask = hd < HALF
        m2 = rmask[:, None] & hmask[None, :]
        trig = rows[:, None].to(tl.int64) * ROT + hd[None, :]
        cos1 = tl.load(cos_ptr + trig, mask=m2, other=1.0)
        sin1 = tl.load(sin_ptr + trig, mask=m2, other=0.0)
        cos2 = tl.load(cos_ptr + trig + HALF, mask=m2, other=1.0)
        sin2 = tl.load(sin_ptr + trig + HALF, mask=m2, other=0.0)
        norm1 = cos1 * cos1 + sin1 * sin1
        norm2 = cos2 * cos2 + sin2 * sin2
    if REST_P > 0:
        rd = tl.arange(0, REST_P)
        rdmask = (rd + ROT) < D
        m3 = rmask[:, None] & rdmask[None, :]
    for layer in range(0, LAYERS):
        for head in range(0, HEADS):
            base = src_ptr + layer * s_l + head * s_h + row_base
            c0 = (layer * HEADS + head) * D
            if ROT > 0:
                x1 = tl.load(base[:, None] + hd[None, :], mask=m2, other=0.0).to(tl.float32)
                x2 = tl.load(base[:, None] + HALF + hd[None, :], mask=m2, other=0.0).to(tl.float32)
                # ModelAdapter's inverse: (head * cos - rotate_half(head) * sin) / (cos^2 + sin^2)
                u1 = tl.math.div_rn(x1 * cos1 + x2 * sin1, norm1)
                u2 = tl.math.div_rn(x2 * cos2 - x1 * sin2, norm2)
                mu1 = tl.load(mean_ptr + c0 + hd, mask=hmask, other=0.0)
                mu2 = tl.load(mean_ptr + c0 + HALF + hd, mask=hmask, other=0.0)
                e1 = tl.load(enc_ptr + (c0 + hd).to(tl.int64)[:, None] * s_ep + cols[None, :] * s_ek,
                             mask=hmask[:, None] & cmask[None, :], other=0.0)
                e2 = tl.load(enc_ptr + (c0 + HALF + hd).to(tl.int64)[:, None] * s_ep + cols[None, :] * s_ek,
                             mask=hmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(tl.where(m2, u1 - mu1[None, :], 0.0), e1, acc, input_precision=PRECISION)
                acc = tl.dot(tl.where(m2, u2 - mu2[None, :], 0.0), e2, acc, input_precision=PRECISION)
            if REST_P > 0:
                x3 = tl.load(base[:, None] + ROT + rd[None, :], mask=m3, other=0.0).to(tl.float32)
                mu3 = tl.load(mean_ptr + c0 + ROT + rd, mask=rdmask, other=0.0)
                e3 = tl.load(enc_ptr + (c0 + ROT + rd).to(tl.int64)[:, None] * s_ep + cols[None, :] * s_ek,
                             mask=rdmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(tl.where(m3, x3 - mu3[None, :], 0.0), e3, acc, input_precision=PRECISION)
    # CoordinateQuantizer.quantize: nan_to_num(c / step).round(), clipped to [-span, span]
    step = tl.load(step_ptr + cols, mask=cmask, other=1.0)
    bound = tl.load(bound_ptr + cols, mask=cmask, other=0.0)
    v = tl.math.div_rn(acc, step[None, :])
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -bound[None, :]), bound[None, :])
    q = _round_half_even(v).to(tl.int32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * s_on + cols[None, :], q, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def decode_kernel(
    codes_ptr, s_cn,  # [N, k] int32
    step_ptr,  # [k] float32
    dec_ptr, s_dk, s_dp,  # [k, heads * head_dim] float32: this layer's decoder columns
    mean_ptr,  # [heads * head_dim] float32: this layer's mean
    item_ptr, tok_ptr,  # [N] int32: batch item and token index (into out) of each row
    cos_ptr, sin_ptr,  # [N, ROT] float32
    out_ptr, s_ob, s_oh, s_ot,  # [batch, heads, tokens, head_dim] in the cache dtype (dim stride 1)
    N, K,
    D: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, OUT_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    kk = tl.arange(0, BLOCK_K)
    c0 = head * D
    if ROT > 0:
        hd = tl.arange(0, HALF_P)
        hmask = hd < HALF
        acc1 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, HALF_P), dtype=tl.float32)
    if REST_P > 0:
        rd = tl.arange(0, REST_P)
        rdmask = (rd + ROT) < D
        acc3 = tl.zeros((BLOCK_M, REST_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + kk) < K
        codes = tl.load(codes_ptr + rows[:, None].to(tl.int64) * s_cn + (k0 + kk)[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0)
        step = tl.load(step_ptr + k0 + kk, mask=kmask, other=0.0)
        coords = codes.to(tl.float32) * step[None, :]  # CoordinateQuantizer.dequantize
        drow = (k0 + kk).to(tl.int64)[:, None] * s_dk
        if ROT > 0:
            d1 = tl.load(dec_ptr + drow + (c0 + hd)[None, :] * s_dp, mask=kmask[:, None] & hmask[None, :], other=0.0)
            d2 = tl.load(dec_ptr + drow + (c0 + HALF + hd)[None, :] * s_dp, mask=kmask[:, None] & hmask[None, :],
                         other=0.0)
            acc1 = tl.dot(coords, d1, acc1, input_precision=PRECISION)
            acc2 = tl.dot(coords, d2, acc2, input_precision=PRECISION)
        if REST_P > 0:
            d3 = tl.load(dec_ptr + drow + (c0 + ROT + rd)[None, :] * s_dp, mask=kmask[:, None] & rdmask[None, :],
                         other=0.0)
            acc3 = tl.dot(coords, d3, acc3, input_precision=PRECISION)
    item = tl.load(item_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    base = out_ptr + item * s_ob + head * s_oh + tok * s_ot
    if ROT > 0:
        m2 = rmask[:, None] & hmask[None, :]
        x1 = acc1 + tl.load(mean_ptr + c0 + hd, mask=hmask, other=0.0)[None, :]
        x2 = acc2 + tl.load(mean_ptr + c0 + HALF + hd, mask=hmask, other=0.0)[None, :]
        trig = rows[:, None].to(tl.int64) * ROT + hd[None, :]
        cos1 = tl.load(cos_ptr + trig, mask=m2, other=1.0)
        sin1 = tl.load(sin_ptr + trig, mask=m2, other=0.0)
        cos2 = tl.load(cos_ptr + trig + HALF, mask=m2, other=1.0)
        sin2 = tl.load(sin_ptr + trig + HALF, mask=m2, other=0.0)
        # ModelAdapter's forward rotation: head * cos + rotate_half(head) * sin
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
        _store_cast(base[:, None] + hd[None, :], y1, m2, OUT_BF16)
        _store_cast(base[:, None] + HALF + hd[None, :], y2, m2, OUT_BF16)
    if REST_P > 0:
        m3 = rmask[:, None] & rdmask[None, :]
        x3 = acc3 + tl.load(mean_ptr + c0 + ROT + rd, mask=rdmask, other=0.0)[None, :]
        _store_cast(base[:, None] + ROT + rd[None, :], x3, m3, OUT_BF16)

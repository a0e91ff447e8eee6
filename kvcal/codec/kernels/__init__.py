"""Fused codec kernels (Triton) for CUDA, each with the pure-torch reference it is tested against.

Two kernels, per PCA group and kind (``triton_kernels.py``):

- **encode**: un-rotate (keys) + centre + project + quantize, from the cache's own tensors (the group's layers
  stacked, as the cache holds them: no float32 row matrix is built) to the int32 codes the entropy stage takes;
- **decode**: dequantize + project back + re-rotate + cast, from the codes straight into the cache tensors.

The codec (``KVTCCodec``, ``kernels="auto"``) takes this path only for CUDA tensors when ``triton`` imports (the
optional extra ``kvcal[triton]``); everywhere else, and for adapters whose RoPE the kernels do not model (MLA,
interleaved pairs, groups mixing rotary types), it keeps the torch path (``kvcal.codec.transform`` +
``kvcal.codec.quantize``), which is also the reference. ``kernels="triton"`` forces the kernels; on a machine
without a GPU that needs ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run them on the CPU).
The entropy stage (``constriction``'s rANS) runs on the host, so the codes leave the device there: that copy and
the blob itself are the only device-to-host transfers of a compress.

**Identity with the torch path.** Every elementwise step (RoPE inverse and forward, centring, the division by
the step, nan handling, clipping, round-half-to-even, the final cast) is the torch path's, in the same order, in
float32, compiled without FMA contraction: given the same coordinates they give the same codes and the same
decoded values, bit for bit. The projections are IEEE float32 dots (never TF32) but accumulate in a different
order than the BLAS (CPU) or cuBLAS (CUDA) call of the torch path, so a coordinate can differ in its last bits;
a code differs only where ``coordinate / step`` lies within that rounding error of a half-integer, and then by
one. Identical codes make identical blobs; a tie makes the two blobs differ by that code (both are valid, and
decode one step apart on that coordinate). Measured on the bundled model (2 x 196 tokens, interpreter against
CPU BLAS): no tie from 16x up (identical blobs), 0-11 codes of 10^5 at 4x-12x, where steps are finest.
``tests/test_kernels.py`` checks exact agreement of everything elementwise, that every code mismatch is such a
tie, and byte-identical blobs where the codes agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch

from kvcal.errors import KvcalError

KERNEL_MODES = ("auto", "triton", "torch")


def block_sizes() -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: GPU tiles, or big ones under the interpreter, whose cost is per program and
    per operation rather than per element (results do not depend on the tiling beyond the dots' summation order)."""
    return (128, 256, 256) if interpreting() else (64, 64, 32)


@cache
def triton_available() -> bool:
    """Whether ``triton`` (the optional extra ``kvcal[triton]``) imports here."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def check_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise KvcalError(f"unknown kernels mode {mode!r}; choose one of {', '.join(KERNEL_MODES)}")
    return mode


def use_kernels(mode: str, device: torch.device) -> bool:
    """The dispatch rule: ``auto`` = CUDA tensors and triton importable; ``triton`` = always (or an error saying
    why it cannot); ``torch`` = never."""
    if mode == "torch":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available() and os.environ.get("KVCAL_KERNELS", "1") != "0"
    if not triton_available():
        raise KvcalError("kernels='triton' needs triton: pip install 'kvcal[triton]'")
    if device.type != "cuda" and not interpreting():
        raise KvcalError(f"kernels='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return True


def group_rotary_dim(adapter, kind: str, layers: tuple[int, ...]) -> int | None:
    """Rotary dims every layer of this group shares for ``kind`` (0: none), when the adapter's ``position_free`` is
    plain half-split RoPE from one table; None otherwise. The kernels undo/redo exactly that, and the torch path
    then re-positions the whole group in one pass (``kvcal.codec.rope_rows``); on None both go layer by layer."""
    from kvcal.adapters.base import ModelAdapter as Base

    cls = type(adapter)
    if cls.position_free is not Base.position_free or cls.at_positions is not Base.at_positions:
        return None
    if kind == "v":
        plain = cls.unrotate_values is Base.unrotate_values and cls.rotate_values is Base.rotate_values
        return 0 if plain else None
    if (adapter.interleaved or cls._apply is not Base._apply or cls.unrotate_keys is not Base.unrotate_keys
            or cls.rotate_keys is not Base.rotate_keys):
        return None
    if adapter._rotary_takes_layer_type and len({adapter.layer_type(layer) for layer in layers}) > 1:
        return None
    rot = adapter.layout().rotary_dim
    return rot if rot % 2 == 0 else None


def _pow2(n: int) -> int:
    return 0 if n <= 0 else max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class RowMap:
    """Where each middle row (item-major, as ``middle_rows`` orders them) sits in the cache."""

    item: torch.Tensor  # [N] int32
    tok: torch.Tensor  # [N] int32 cache index
    lo: int  # smallest cache index of any row
    hi: int  # one past the largest


def row_map(geo, device: torch.device) -> RowMap:
    items, toks, lo_min, hi_max = [], [], None, 0
    for item in range(geo.batch):
        lo, hi = geo.middle(item)
        if hi <= lo:
            continue
        items.append(torch.full((hi - lo,), item, dtype=torch.int32))
        toks.append(torch.arange(lo, hi, dtype=torch.int32))
        lo_min = lo if lo_min is None else min(lo_min, lo)
        hi_max = max(hi_max, hi)
    if not items:
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return RowMap(empty, empty, 0, 0)
    return RowMap(torch.cat(items).to(device), torch.cat(toks).to(device), lo_min, hi_max)


def row_rope(adapter, layer: int, geo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[N, rot]`` float32 at each middle row's true position: the tables the torch path uses."""
    cos, sin = [], []
    for item in range(geo.batch):
        lo, hi = geo.middle(item)
        if hi <= lo:
            continue
        c, s = adapter.cos_sin(layer, geo.positions(item, lo, hi, device))
        cos.append(c[0].to(device))
        sin.append(s[0].to(device))
    return torch.cat(cos).float().contiguous(), torch.cat(sin).float().contiguous()


DOT_PRECISIONS = ("ieee", "tf32")


def dot_precision() -> str:
    """The projections' dot precision: ``ieee`` float32 (the default: codes as the torch path's, but for ties) or,
    with ``KVCAL_KERNEL_PRECISION=tf32``, TF32 tensor cores (several times faster on Ampere and later, but inputs
    rounded to 10 mantissa bits: many more codes differ from the CPU's, so blobs are no longer the CPU's)."""
    value = os.environ.get("KVCAL_KERNEL_PRECISION", "ieee")
    if value not in DOT_PRECISIONS:
        raise KvcalError(f"KVCAL_KERNEL_PRECISION={value!r}; use one of {', '.join(DOT_PRECISIONS)}")
    return value


def _launch_options() -> dict:
    # No FMA contraction: the elementwise steps then round exactly as torch's separate kernels do.
    return {} if interpreting() else {"enable_fp_fusion": False, "num_warps": 4}


# --- the kernels, through their launch wrappers -------------------------------------------------------------
def fused_encode(src: torch.Tensor, item: torch.Tensor, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rot: int, mean: torch.Tensor, encoder: torch.Tensor, step: torch.Tensor,
                 bound: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, k]`` int32 of rows ``(item, tok)`` of ``src`` ``[layers, batch, heads, tokens, head_dim]``."""
    from kvcal.codec.kernels.triton_kernels import encode_kernel

    layers, _, heads, _, d = src.shape
    n, k = item.shape[0], encoder.shape[1]
    out = torch.empty(n, k, dtype=torch.int32, device=src.device)
    if n == 0 or k == 0:
        return out
    if src.stride(4) != 1:
        src = src.contiguous()
    if not rot:
        cos = sin = torch.ones(1, dtype=torch.float32, device=src.device)
    block_m, block_n, _ = block_sizes()
    grid = (triton_cdiv(n, block_m), triton_cdiv(k, block_n))
    encode_kernel[grid](
        src, src.stride(0), src.stride(1), src.stride(2), src.stride(3), item, tok, cos, sin, mean,
        encoder, encoder.stride(0), encoder.stride(1), step, bound, out, out.stride(0), n, k, layers, heads,
        D=d, ROT=rot, HALF=rot // 2, HALF_P=_pow2(rot // 2), REST_P=_pow2(d - rot), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(),
        **_launch_options(),
    )
    return out


def fused_decode(codes: torch.Tensor, step: torch.Tensor, decoder: torch.Tensor, mean: torch.Tensor,
                 item: torch.Tensor, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int,
                 out: torch.Tensor) -> None:
    """Write rows ``(item, tok)`` of ``out`` ``[batch, heads, tokens, head_dim]`` from ``codes`` ``[N, k]``, with
    this layer's ``decoder`` ``[k, heads * head_dim]`` columns and ``mean``."""
    from kvcal.codec.kernels.triton_kernels import decode_kernel

    n, k = codes.shape
    _, heads, _, d = out.shape
    if n == 0:
        return
    if out.stride(3) != 1:
        raise KvcalError("fused_decode writes into a cache tensor whose last dimension is contiguous")
    if not rot:
        cos = sin = torch.ones(1, dtype=torch.float32, device=out.device)
    block_m, _, block_k = block_sizes()
    grid = (triton_cdiv(n, block_m), heads)
    decode_kernel[grid](
        codes, codes.stride(0), step, decoder, decoder.stride(0), decoder.stride(1), mean.contiguous(), item, tok,
        cos, sin, out, out.stride(0), out.stride(1), out.stride(2), n, k,
        D=d, ROT=rot, HALF=rot // 2, HALF_P=_pow2(rot // 2), REST_P=_pow2(d - rot), BLOCK_M=block_m, BLOCK_K=block_k,
        OUT_BF16=out.dtype == torch.bfloat16, PRECISION=dot_precision(),
        **_launch_options(),
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compile_for(arch: int = 90, head_dim: int = 128, only: tuple[str, ...] | None = None) -> dict[str, int]:
    """Compile every kernel variant the codec launches (keys with full and partial RoPE, values; bf16 and fp16
    caches) down to a cubin for ``sm_<arch>``, with no GPU: what CI can check of the GPU build. Returns the cubin
    sizes by variant name (``only``: just those names). Needs triton and no ``TRITON_INTERPRET`` (the interpreter
    replaces the compiler)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvcal.codec.kernels import triton_kernels as tk

    def signature(fn, pointers: dict[str, str], consts: dict) -> dict[str, str]:
        names = inspect.signature(fn.fn).parameters
        return {n: "constexpr" if n in consts else pointers.get(n, "i64" if n == "s_l" else "i32") for n in names}

    enc_ptrs = {n: "*fp32" for n in ("cos_ptr", "sin_ptr", "mean_ptr", "enc_ptr", "step_ptr", "bound_ptr")}
    enc_ptrs |= {"item_ptr": "*i32", "tok_ptr": "*i32", "out_ptr": "*i32"}
    dec_ptrs = {n: "*fp32" for n in ("step_ptr", "dec_ptr", "mean_ptr", "cos_ptr", "sin_ptr")}
    dec_ptrs |= {"codes_ptr": "*i32", "item_ptr": "*i32", "tok_ptr": "*i32"}
    block_m, block_n, block_k = 64, 64, 32
    sizes = {}
    for rot in (head_dim, head_dim // 2, 0):
        shape = dict(D=head_dim, ROT=rot, HALF=rot // 2, HALF_P=_pow2(rot // 2), REST_P=_pow2(head_dim - rot), PRECISION="ieee")
        for dtype in ("bf16", "fp16"):
            jobs = (
                ("encode", tk.encode_kernel, enc_ptrs | {"src_ptr": f"*{dtype}"},
                 shape | {"BLOCK_M": block_m, "BLOCK_N": block_n}),
                ("decode", tk.decode_kernel, dec_ptrs | {"out_ptr": f"*{dtype}"},
                 shape | {"BLOCK_M": block_m, "BLOCK_K": block_k, "OUT_BF16": dtype == "bf16"}),
            )
            for name, fn, ptrs, consts in jobs:
                variant = f"{name}-rot{rot}-{dtype}"
                if only is not None and variant not in only:
                    continue
                src = ASTSource(fn=fn, signature=signature(fn, ptrs, consts), constexprs=consts)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"enable_fp_fusion": False, "num_warps": 4})
                sizes[variant] = len(compiled.asm["cubin"])
    return sizes


def decode_cache_layer(cache, layer: int, kind: str, g: int, rot: int, dtype, device, batch: int) -> torch.Tensor:
    """``KVTCCache``'s decoded middle of one layer, ``[batch, heads, tokens, head_dim]`` in ``dtype``, from its coded
    blocks (rows block-major, then batch, then token, as ``code_full_blocks`` coded them)."""
    codec, middle = cache.codec, cache.middle
    device = torch.device(device)

    def row_map():
        items, toks, positions = [], [], []
        for i, start in enumerate(middle.block_starts):
            n = cache._block_len(i)
            items.append(torch.arange(batch, dtype=torch.int32).repeat_interleave(n))
            toks.append((torch.arange(n, dtype=torch.int32) + (start - cache.sink)).repeat(batch))
            positions.append((torch.arange(n) + start).repeat(batch))
        pos = torch.cat(positions).to(device)[None]
        cos, sin = codec.adapter.cos_sin(codec.groups[g][0], pos) if rot else (None, None)
        return (torch.cat(items).to(device), torch.cat(toks).to(device),
                None if cos is None else cos[0].to(device).float().contiguous(),
                None if sin is None else sin[0].to(device).float().contiguous())

    item, tok, cos, sin = middle.cached(("rows", g, batch), row_map)
    codes = middle.codes(kind, g, device)
    projection, quantizer = codec.placed(kind, g, device)
    heads = codec.layout.num_kv_heads
    d = codec.layout.head_dim if kind == "k" else codec.layout.v_head_dim
    out = torch.empty(batch, heads, middle.tokens, d, dtype=dtype, device=device)
    sl = projection.layer_slices[layer]
    fused_decode(codes, quantizer.step, projection.decoder[:, sl], projection.mean[sl], item, tok, cos, sin, rot, out)
    return out


# --- their pure-torch references (the codec's torch path, on the same arguments) ---------------------------
def _rows_of(src: torch.Tensor, item: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``[N, layers, heads, head_dim]`` float32 rows of ``src``."""
    return src[:, item.long(), :, tok.long()].float()  # indices split by a slice: their dim comes first


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, inverse: bool) -> torch.Tensor:
    """``ModelAdapter._apply`` in its textbook form, on rows ``[N, ..., head_dim]`` with per-row ``cos``/``sin``:
    ``(h*cos - rotate_half(h)*sin) / (cos^2 + sin^2)`` undoes RoPE, ``h*cos + rotate_half(h)*sin`` applies it."""
    from kvcal.adapters.base import rotate_half

    if not rot:
        return x
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rot,)
    c, s = cos.reshape(shape), sin.reshape(shape)
    head, tail = x[..., :rot], x[..., rot:]
    head = (head * c - rotate_half(head) * s) / (c * c + s * s) if inverse else head * c + rotate_half(head) * s
    return torch.cat((head, tail), dim=-1)


def encode_reference(src, item, tok, cos, sin, rot, mean, encoder, step, bound) -> torch.Tensor:
    """``fused_encode`` the torch path's way: ``position_free`` -> ``Projection.project`` -> ``quantize``."""
    rows = rope_reference(_rows_of(src, item, tok), cos, sin, rot, inverse=True).reshape(item.shape[0], -1)
    coords = (rows - mean) @ encoder
    q = torch.nan_to_num(coords / step, nan=0.0).round()
    return torch.maximum(torch.minimum(q, bound), -bound).to(torch.int32)


def decode_reference(codes, step, decoder, mean, item, tok, cos, sin, rot, out) -> None:
    """``fused_decode`` the torch path's way: ``dequantize`` -> ``reconstruct_layer`` -> ``at_positions``."""
    _, heads, _, d = out.shape
    x = (codes.float() * step) @ decoder + mean
    x = rope_reference(x.reshape(codes.shape[0], heads, d), cos, sin, rot, inverse=False)
    out[item.long(), :, tok.long()] = x.to(out.dtype)


# --- the codec's hooks --------------------------------------------------------------------------------------
def encode_group(codec, kv, geo, kind: str, g: int, rot: int) -> torch.Tensor:
    """Codes ``[N, k]`` int32 (on the cache's device) of the middle rows of ``kind``, PCA group ``g``."""
    layers = codec.groups[g]
    device = kv[layers[0]][0].device
    projection, quantizer = codec.placed(kind, g, device)
    rows = row_map(geo, device)
    idx = 0 if kind == "k" else 1
    src = torch.stack([kv[layer][idx][:, :, rows.lo : rows.hi] for layer in layers])
    cos, sin = row_rope(codec.adapter, layers[0], geo, device) if rot else (None, None)
    return fused_encode(src, rows.item, rows.tok - rows.lo, cos, sin, rot, projection.mean, projection.encoder,
                        quantizer.step, quantizer.bound)


def decode_group(codec, kv, geo, kind: str, g: int, rot: int, codes: torch.Tensor) -> None:
    """Decode ``codes`` ``[N, k]`` (on the device) into the middle of ``kv``'s tensors, in place."""
    layers = codec.groups[g]
    device = codes.device
    projection, quantizer = codec.placed(kind, g, device)
    rows = row_map(geo, device)
    cos, sin = row_rope(codec.adapter, layers[0], geo, device) if rot else (None, None)
    idx = 0 if kind == "k" else 1
    for layer in layers:
        sl = projection.layer_slices[layer]
        fused_decode(codes, quantizer.step, projection.decoder[:, sl], projection.mean[sl], rows.item, rows.tok,
                     cos, sin, rot, kv[layer][idx])

"""What a blob's header says about the cache it holds, and the check of every field before a payload byte is read.

The header is the codec's part of the container (``kvcal.codec.bitstream``): the exact set of fields in
``HEADER_FIELDS``, each checked against the codec that reads it (artifact, model type, ratio, sink, window) and
against the others (lengths, padding, layers). A blob with an unknown or a missing field is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvcal.adapters import KVLayout
from kvcal.codec.bitstream import require_int, require_list, require_str
from kvcal.errors import BitstreamError

BLOB_KIND = "kvcal-kvtc"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_DIM = 1 << 20
MAX_POSITION = 1 << 40
HEADER_FIELDS = frozenset({
    "kind", "artifact_id", "ratio", "entropy", "model_type", "batch", "seq_len", "dtype", "layer_lens", "sliding",
    "pads", "offsets", "sink", "window",
})


def dtype_name(dtype: torch.dtype) -> str | None:
    """The header's name of a cache dtype (``DTYPES``), None for an unsupported one."""
    return next((name for name, dt in DTYPES.items() if dt == dtype), None)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf: min and max are finite exactly then (both propagate NaN), and one
    ``aminmax`` pass costs a fraction of ``isfinite(t).all()``, which materialises a mask (about 15x on bf16)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


# Same-width integer views of the cache dtypes (numpy has no bfloat16, numba no float16; torch's integer views are
# free) and the exponent bits that make a value inf or NaN.
HOST_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
             torch.float16: (torch.int16, 0x7C00)}


def host_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU float tensor's elements as a numpy integer array of the same width (a view, no copy; any strides)."""
    return t.view(HOST_BITS[t.dtype][0]).numpy()


def host_all_finite(t: torch.Tensor) -> bool:
    """``all_finite`` for a CPU tensor, from its exponent bits with numpy: single-threaded, so it runs beside the
    codec's workers without torch's intra-op threads waiting on a core a worker holds."""
    if t.numel() == 0:
        return True
    exponent = HOST_BITS[t.dtype][1]
    return not bool(np.any((host_bits(t) & exponent) == exponent))


@dataclass(frozen=True)
class CacheGeometry:
    """Shapes and positions of one cache; the header carries it and every section size derives from it."""

    batch: int
    seq_len: int
    dtype: str
    layer_lens: tuple[int, ...]  # tokens held per layer (sliding layers may hold fewer)
    sliding: tuple[int, ...]  # per layer: sliding window size, 0 for full attention
    pads: tuple[int, ...]  # left-padding slots per batch item
    offsets: tuple[int, ...]  # position of each item's first real token
    sink: int
    window: int

    def middle(self, item: int) -> tuple[int, int]:
        """Cache indices ``[lo, hi)`` of the transform-coded tokens of one batch item.

        Sinks come first and the window last; a cache too short for both has an empty middle (``lo == hi``) and
        is stored exactly, whatever its length, from one token up.
        """
        lo = min(self.pads[item] + self.sink, self.seq_len)
        hi = max(self.seq_len - self.window, lo)
        return lo, hi

    @property
    def middle_tokens(self) -> int:
        return sum(hi - lo for lo, hi in (self.middle(i) for i in range(self.batch)))

    def exact_tokens(self, item: int) -> int:
        lo, hi = self.middle(item)
        return self.seq_len - self.pads[item] - (hi - lo)

    def positions(self, item: int, lo: int, hi: int, device) -> torch.Tensor:
        """True positions ``[1, hi - lo]`` of cache indices ``lo..hi`` of ``item``."""
        start = self.first_position(item, lo)
        return torch.arange(start, start + hi - lo, device=device)[None]

    def first_position(self, item: int, lo: int) -> int:
        """True position of cache index ``lo`` of ``item``."""
        return self.offsets[item] + lo - self.pads[item]

    def header_fields(self) -> dict:
        return {
            "batch": self.batch, "seq_len": self.seq_len, "dtype": self.dtype, "layer_lens": list(self.layer_lens),
            "sliding": list(self.sliding), "pads": list(self.pads), "offsets": list(self.offsets),
            "sink": self.sink, "window": self.window,
        }


def check_header_keys(header: dict) -> None:
    unknown, missing = sorted(set(header) - HEADER_FIELDS), sorted(HEADER_FIELDS - set(header))
    if unknown:
        raise BitstreamError(f"kvcal blob header has unknown field(s) {', '.join(map(repr, unknown))[:80]}; "
                             "it was not written by this kvcal")
    if missing:
        raise BitstreamError(f"kvcal blob header lacks field(s) {', '.join(map(repr, missing))}")


def read_geometry(header: dict, layout: KVLayout, sink: int, window: int) -> CacheGeometry:
    """Validate the shape fields against each other, the layout and the codec's sink and window."""
    n_layers = layout.num_layers
    b = require_int(header, "batch", 1, MAX_DIM)
    n = require_int(header, "seq_len", 1, MAX_DIM)
    dtype = require_str(header, "dtype", tuple(DTYPES))
    blob_sink = require_int(header, "sink", 0, MAX_DIM)
    blob_window = require_int(header, "window", 0, MAX_DIM)
    if (blob_sink, blob_window) != (sink, window):
        raise BitstreamError(f"kvcal blob keeps sink {blob_sink} and window {blob_window} exact, this codec "
                             f"{sink} and {window}; load the codec with sink={blob_sink}, window={blob_window}")
    lens = _ints(header, "layer_lens", n_layers, 0, n)
    sliding = _ints(header, "sliding", n_layers, 0, MAX_DIM)
    pads = _ints(header, "pads", b, 0, n - 1)
    offsets = _ints(header, "offsets", b, 0, MAX_POSITION)
    if any(lens[i] != n or sliding[i] for i in layout.coded_layers):
        raise BitstreamError("kvcal blob header: every full-attention layer must hold seq_len tokens, unwindowed")
    # A sliding-window layer (transformers' DynamicSlidingWindowLayer) keeps its last window - 1 tokens: more
    # could not have come from one, and decompress would silently drop them.
    for i, (held, w) in enumerate(zip(lens, sliding, strict=True)):
        if w > 1 and held >= w:
            raise BitstreamError(f"kvcal blob header: layer {i} holds {held} tokens, but its sliding window of {w} "
                                 f"keeps at most {w - 1}")
    return CacheGeometry(b, n, dtype, tuple(lens), tuple(sliding), tuple(pads), tuple(offsets), sink, window)


def _ints(header: dict, key: str, count: int, lo: int, hi: int) -> list[int]:
    values = require_list(header, key, count, count)
    if not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in values):
        raise BitstreamError(f"kvcal blob header field {key!r} must hold {count} integers in [{lo}, {hi}]")
    return values

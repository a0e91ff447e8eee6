"""``KVTCCache``: a transformers cache for ``generate()`` that keeps its middle transform-coded.

Like transformers' ``QuantizedLayer``, each layer keeps a full-precision residual: the first ``sink``
tokens and the recent tail. When every coded layer's tail exceeds ``window + block`` tokens, the oldest
whole blocks beyond the window leave the tail of *all* coded layers at once (the PCA basis may span
layers, so a token is coded jointly across them) and are stored as packed codes plus fp16 metadata.
Attention sees the middle decoded on demand at each step, so resident memory holds only the codes.
Tokens keep their true positions: RoPE is undone before coding and redone after decoding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvcal.codec import kernels
from kvcal.codec.kvtc import KINDS, CodedRows, KVTCCodec


class _CodedMiddle:
    """The coded middle shared by all layers, plus a per-step cache of decoded coordinates."""

    def __init__(self, codec: KVTCCodec):
        self.codec = codec
        self.blocks: list[dict[tuple[str, int], CodedRows]] = []
        self.block_starts: list[int] = []  # position of each block's first token
        self.tokens = 0
        self._coords: dict[tuple[str, int], torch.Tensor] = {}
        self._coords_version = -1
        self.version = 0

    def add_block(self, start: int, n_tokens: int, rows: dict[tuple[str, int], CodedRows]) -> None:
        self.blocks.append(rows)
        self.block_starts.append(start)
        self.tokens += n_tokens
        self.version += 1

    def cached(self, key: tuple, make):
        """``make()``, kept until a block is added (or ``drop_decoded``)."""
        if self._coords_version != self.version:
            self._coords, self._coords_version = {}, self.version
        if key not in self._coords:
            self._coords[key] = make()
        return self._coords[key]

    def _decoded_codes(self, kind: str, g: int) -> torch.Tensor:
        """Int32 codes ``[rows, k]`` of every block, on the host (where the entropy stage decodes them)."""
        models = self.codec.quantizers[(kind, g)].models
        return torch.cat([torch.from_numpy(self.codec.stage.decode(block[(kind, g)].payload, block[(kind, g)].n, models))
                          for block in self.blocks])

    def coords(self, kind: str, g: int, device) -> torch.Tensor:
        """Dequantized kept coordinates ``[rows, k]`` of every block on ``device``."""
        quantizer = self.codec.placed(kind, g, device)[1]
        return self.cached((kind, g), lambda: quantizer.dequantize(self._decoded_codes(kind, g), device))

    def codes(self, kind: str, g: int, device) -> torch.Tensor:
        """Int32 codes ``[rows, k]`` of every block on ``device``, for the fused decode kernel (which dequantizes)."""
        return self.cached((kind, g, "codes"), lambda: self._decoded_codes(kind, g).to(device, torch.int32).contiguous())

    def drop_decoded(self) -> None:
        self._coords, self._coords_version = {}, -1

    def nbytes(self) -> int:
        return sum(rows.nbytes() for block in self.blocks for rows in block.values())


class KVTCLayer(DynamicLayer):
    """One coded layer: ``keys``/``values`` hold the full-precision sinks + tail; the middle lives in the store."""

    def __init__(self, cache: KVTCCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.full_states()
        if self.layer_idx == self.cache.last_coded_layer:
            self.cache.code_full_blocks()
        return keys, values

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        middle = self.cache.middle
        if middle.tokens == 0:
            return self.keys, self.values
        sink = self.cache.sink
        mid_k, mid_v = self.cache.decode_layer(self.layer_idx, self.keys.dtype, self.keys.device)
        keys = torch.cat([self.keys[:, :, :sink], mid_k, self.keys[:, :, sink:]], dim=-2)
        values = torch.cat([self.values[:, :, :sink], mid_v, self.values[:, :, sink:]], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVTCCache cannot be cropped: coded blocks are immutable")


class KVTCCache(Cache):
    """A ``transformers`` Cache whose middle tokens are transform-coded with a kvcal codec.

    ``block`` tokens are coded at a time once they leave the recent ``window``; sinks and the window stay exact.
    Sliding-window layers (Gemma) are left to transformers' own bounded layers. Batch rows share positions
    (no left padding). Everything stays on the cache's device except the coded bytes, which the entropy stage
    (on the host) produces and reads; ``device`` only places the codec's tensors there up front.
    """

    def __init__(self, codec: KVTCCodec, block: int = 64, window: int | None = None, sink: int | None = None, config=None,
                 device=None):
        if device is not None:  # place the codec's projections and steps there now, not at the first coded block
            codec.to(device)
        self.codec = codec
        self.block = block
        self.sink = codec.sink if sink is None else sink
        self.window = codec.window if window is None else window
        self.middle = _CodedMiddle(codec)
        layout = codec.layout
        sliding = _sliding_windows(config, layout.num_layers) if config is not None else {}
        layers = []
        for i in range(layout.num_layers):
            if i in layout.exact_layers:
                layers.append(DynamicSlidingWindowLayer(sliding[i]) if sliding.get(i) else DynamicLayer())
            else:
                layers.append(KVTCLayer(self, i))
        self.coded_layers = layout.coded_layers
        self.last_coded_layer = max(self.coded_layers) if self.coded_layers else -1
        super().__init__(layers=layers)

    def code_full_blocks(self) -> None:
        """Move whole blocks from the tail (beyond the window) into the coded middle, for all coded layers at once."""
        first = self.layers[self.coded_layers[0]]
        tail = first.keys.shape[-2] - self.sink
        n_blocks = (tail - self.window) // self.block
        if n_blocks <= 0:
            return
        n = n_blocks * self.block
        start = self.sink + self.middle.tokens
        lo, hi = self.sink, self.sink + n
        codec = self.codec
        positions = torch.arange(start, start + n, device=first.keys.device)
        rows: dict[tuple[str, int], CodedRows] = {}
        for kind in KINDS:
            for g, layers in enumerate(codec.groups):
                parts = []
                for layer in layers:
                    lay = self.layers[layer]
                    t = (lay.keys if kind == "k" else lay.values)[:, :, lo:hi]
                    t = codec.adapter.position_free(kind, t, layer, positions[None].expand(t.shape[0], -1))
                    parts.append(t.permute(0, 2, 1, 3).reshape(t.shape[0] * n, -1))
                rows[(kind, g)] = codec.encode_rows(kind, g, torch.cat(parts, dim=1))
        for layer in self.coded_layers:
            lay = self.layers[layer]
            lay.keys = torch.cat([lay.keys[:, :, :lo], lay.keys[:, :, hi:]], dim=-2)
            lay.values = torch.cat([lay.values[:, :, :lo], lay.values[:, :, hi:]], dim=-2)
        self.middle.add_block(start, n, rows)

    def decode_layer(self, layer: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        codec = self.codec
        g = next(i for i, layers in enumerate(codec.groups) if layer in layers)
        out = []
        batch = self.layers[layer].keys.shape[0]
        n = self.middle.tokens
        for kind in KINDS:
            rot = codec.kernel_rotary_dim(kind, g, torch.device(device))
            if rot is not None:  # fused dequantize + project back + re-rotate + cast (kvcal.codec.kernels)
                out.append(kernels.decode_cache_layer(self, layer, kind, g, rot, dtype, device, batch))
                continue
            coords = self.middle.coords(kind, g, device)
            x = codec.reconstruct_layer(kind, g, coords, layer)  # [batch*n, h, d], block-major
            x = self._block_major_to_batch(x, batch)  # [b, h, n, d]
            positions = torch.cat([torch.arange(s, s + self._block_len(i), device=device)
                                   for i, s in enumerate(self.middle.block_starts)])
            x = codec.adapter.at_positions(kind, x, layer, positions[None].expand(batch, -1))
            out.append(x.to(dtype))
        if layer == self.last_coded_layer:
            self.middle.drop_decoded()  # decoded coordinates live for one forward step only
        assert out[0].shape[-2] == n
        return out[0], out[1]

    def _block_len(self, i: int) -> int:
        starts = self.middle.block_starts + [self.sink + self.middle.tokens]
        return starts[i + 1] - starts[i]

    def _block_major_to_batch(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        # Each block was coded as [batch, block_len] rows; regroup so tokens of one batch row are contiguous.
        parts, row = [], 0
        for i in range(len(self.middle.blocks)):
            n = self._block_len(i)
            parts.append(x[row : row + batch * n].reshape(batch, n, *x.shape[1:]))
            row += batch * n
        return torch.cat(parts, dim=1).permute(0, 2, 1, 3)

    def resident_bytes(self) -> int:
        """Bytes the cache holds between steps: exact tokens plus the coded middle (no transient decodes)."""
        exact = sum(t.numel() * t.element_size() for lay in self.layers if lay.is_initialized for t in (lay.keys, lay.values))
        return exact + self.middle.nbytes()


def _sliding_windows(config, n_layers: int) -> dict[int, int]:
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    return {i: window for i, t in enumerate(types) if t == "sliding_attention" and window}


def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for lay in cache.layers if lay.is_initialized for t in (lay.keys, lay.values))

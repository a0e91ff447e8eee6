"""One small adapter per model family; each says only how it differs from Llama."""

from __future__ import annotations

import torch
from torch import nn

from kvcal.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2: separate q/k/v projections, RoPE on the whole head."""

    model_types = ("llama", "mistral", "qwen2")


class QkNormAdapter(ModelAdapter):
    """Qwen3: an RMSNorm per head on q and k *before* RoPE, so the pre-RoPE key is the norm's output."""

    model_types = ("qwen3",)

    def query_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).q_norm

    def key_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).k_norm


class Gemma2Adapter(ModelAdapter):
    """Gemma 2: alternating sliding/global layers sharing one RoPE; sliding layers stay exact."""

    model_types = ("gemma2",)


class Gemma3Adapter(QkNormAdapter):
    """Gemma 3: q/k norm before RoPE, and a different rope theta for sliding and global layers.

    The per-layer theta comes for free: the rotary module is asked for the layer's own ``layer_type``.
    """

    model_types = ("gemma3_text",)

    # Gemma 3 applies its norms after the heads are transposed out: the norm output is already [b, h, n, d].
    def split_query(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def split_key(self, output: torch.Tensor) -> torch.Tensor:
        return output


class Phi3Adapter(ModelAdapter):
    """Phi-3: one fused ``qkv_proj``; partial rotary (``partial_rotary_factor``) rotates only leading dims."""

    model_types = ("phi3",)

    def query_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).qkv_proj

    def key_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).qkv_proj

    def _slices(self) -> tuple[slice, slice]:
        c, d = self.config, self.head_dim()
        q = c.num_attention_heads * d
        k = (c.num_key_value_heads or c.num_attention_heads) * d
        return slice(0, q), slice(q, q + k)

    def split_query(self, output: torch.Tensor) -> torch.Tensor:
        return super().split_query(output[..., self._slices()[0]])

    def split_key(self, output: torch.Tensor) -> torch.Tensor:
        return super().split_key(output[..., self._slices()[1]])

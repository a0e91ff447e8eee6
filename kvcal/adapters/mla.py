"""DeepSeek-V3 multi-head latent attention (MLA), as transformers caches it.

transformers' ``DeepseekV3Attention`` caches the compressed latents, not per-head keys and values:

- ``layer.keys``  ``[b, 1, n, kv_lora_rank]``: ``c_kv``, the ``kv_a_layernorm`` output. It carries no
  position (every head's ``k_nope`` and value are linear in it, through ``kv_b_proj``), so "un-rotating"
  it is the identity and the codec transform-codes it as it is.
- ``layer.values`` ``[b, 1, n, qk_rope_head_dim]``: ``k_rot``, the key part shared by all heads, stored
  *after* RoPE. The codec codes values without un-rotating them, so this part is coded rotated.

So the KV layout is one "head" with ``head_dim = kv_lora_rank`` and ``v_head_dim = qk_rope_head_dim``.
Attention statistics need the real per-head keys; they come from the model's own ``expand_kv``.
"""

from __future__ import annotations

import torch
from torch import nn

from kvcal.adapters.base import KVLayout, ModelAdapter
from kvcal.errors import ModelError


class DeepseekV3Adapter(ModelAdapter):
    """MLA: queries and expanded keys are ``[k_nope | k_rope]`` per head; RoPE (maybe interleaved) on the tail."""

    model_types = ("deepseek_v3",)
    supports_attention_metric = False  # the cache holds the latent c_kv, not what queries and o_proj read

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from transformers.models.deepseek_v3 import modeling_deepseek_v3

        # Before ``expand_kv`` existed, transformers cached expanded per-head keys and (maybe padded) values.
        if not hasattr(modeling_deepseek_v3.DeepseekV3Attention, "expand_kv"):
            raise ModelError("this transformers version caches expanded DeepSeek-V3 keys; kvcal needs one that "
                             "caches the MLA latent (DeepseekV3Attention.expand_kv): upgrade transformers")
        self.interleaved = bool(self.config.rope_interleave)

    def head_dim(self) -> int:
        """Size of one attention head of queries and expanded keys (the config's ``head_dim`` is the rotary size)."""
        return self.config.qk_nope_head_dim + self.config.qk_rope_head_dim

    def layout(self) -> KVLayout:
        c = self.config
        return KVLayout(num_layers=c.num_hidden_layers, num_kv_heads=1, head_dim=c.kv_lora_rank,
                        v_head_dim=c.qk_rope_head_dim, rotary_dim=0)

    # The cached "keys" are the position-free latent.
    def unrotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return keys.float()

    def rotate_keys(self, keys: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return keys.float()

    def rotate_queries(self, queries: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        nope = self.config.qk_nope_head_dim
        q = queries.float()
        return torch.cat((q[..., :nope], self._apply(q[..., nope:], layer_idx, positions, inverse=False)), dim=-1)

    def unrotate_rope_keys(self, k_rot: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        """The cached shared rotary key (``layer.values``) -> pre-RoPE ``k_pe`` as ``kv_a_proj_with_mqa`` gives it."""
        return self._apply(k_rot, layer_idx, positions, inverse=True)

    # transformers caches MLA's shared rotary key part in the *values* slot: un-rotate it there, so the value
    # basis is fitted on (and codes) position-free vectors like every other family's keys.
    def unrotate_values(self, values: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return self.unrotate_rope_keys(values, layer_idx, positions)

    def rotate_values(self, values: torch.Tensor, layer_idx: int, positions: torch.Tensor) -> torch.Tensor:
        return self._apply(values, layer_idx, positions, inverse=False)

    def attention_keys(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.attention(layer_idx).expand_kv(keys, values)[0]

    def query_source(self, layer_idx: int) -> nn.Module:
        attn = self.attention(layer_idx)
        return attn.q_proj if attn.q_proj is not None else attn.q_b_proj

    def key_source(self, layer_idx: int) -> nn.Module:
        return self.attention(layer_idx).kv_a_layernorm

    def split_key(self, output: torch.Tensor) -> torch.Tensor:
        return output.unsqueeze(1)  # [b, n, kv_lora_rank] -> one latent "head"

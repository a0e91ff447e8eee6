"""Tiny random-weight models of every supported family, written to a directory in Hugging Face format.

Random weights say nothing about compression quality; these exist to exercise architecture adapters fast.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 1024, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, head_dim=16, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    if family == "mistral":
        return tf.MistralConfig(**COMMON, head_dim=16, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256})
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=512,
                               query_pre_attn_scalar=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=512,
                                   sliding_window_pattern=2, query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**COMMON, partial_rotary_factor=0.5, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    if family in MLA_FAMILIES:
        # MLA with tiny latents; like DeepSeek-V3: interleaved rotary pairs, YaRN whose attention factor is not 1,
        # q LoRA and a routed-MoE layer. The "_halves" variant covers the other branches (rotate_half, no q LoRA).
        interleaved = family == "deepseek_v3"
        rope = ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
                 "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32.0, "beta_slow": 1.0}
                if interleaved else {"rope_type": "default", "rope_theta": 10000.0})
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, kv_lora_rank=32,
                                   q_lora_rank=24 if interleaved else None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                   v_head_dim=12, rope_interleave=interleaved, rope_parameters=rope,
                                   first_k_dense_replace=1 if interleaved else 2, moe_intermediate_size=16,
                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, num_mtp_layers=0)
    raise ValueError(family)


# Not in FAMILIES: transformers caches MLA's latent, whose "keys" carry no RoPE (see tests/test_mla.py).
MLA_FAMILIES = ("deepseek_v3", "deepseek_v3_halves")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def write_tiny_model(family: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model plus a byte-level tokenizer, saved so ``AutoModelForCausalLM`` loads it offline."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves RMSNorm weights at 1 (or 0 for Gemma's 1+w): perturb so norms matter in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_byte_tokenizer(out)
    return out


def write_byte_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>" if i < 2 else bytes_to_unicode_char(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<1>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<0>", bos_token="<0>", unk_token="<1>", pad_token="<0>")
    fast.save_pretrained(out)


def bytes_to_unicode_char(i: int) -> str:
    return chr(i)


def mutate_payload(rng, payload: bytearray, kind: int, state_bytes: int = 0) -> bytearray:
    """An entropy-coded section, mutated: 0 a bit flip, 1 a truncation to whole words, 2 extra words, 3 random
    leading ``state_bytes`` (the coder's states), anything else whole random words."""
    import numpy as np

    if kind == 0:
        payload[rng.integers(len(payload))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        payload = payload[: 4 * int(rng.integers(0, len(payload) // 4))]
    elif kind == 2:
        payload += bytes(rng.integers(0, 256, size=4 * int(rng.integers(1, 4)), dtype=np.uint8))
    elif kind == 3 and state_bytes:
        payload[:state_bytes] = rng.integers(0, 256, size=state_bytes, dtype=np.uint8).tobytes()
    else:
        payload = bytearray(rng.integers(0, 256, size=4 * int(rng.integers(0, 400)), dtype=np.uint8).tobytes())
    return payload

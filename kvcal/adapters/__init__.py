"""Architecture adapters, registered by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from kvcal.adapters.base import KVLayout, ModelAdapter
from kvcal.adapters.families import Gemma2Adapter, Gemma3Adapter, LlamaAdapter, Phi3Adapter, QkNormAdapter
from kvcal.adapters.mla import DeepseekV3Adapter
from kvcal.errors import ModelError

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls
    for cls in (LlamaAdapter, QkNormAdapter, Gemma2Adapter, Gemma3Adapter, Phi3Adapter, DeepseekV3Adapter)
    for t in cls.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family, or a ``ModelError`` naming the architecture."""
    config = model.config.get_text_config(decoder=True)
    cls = ADAPTERS.get(config.model_type)
    if cls is None:
        raise ModelError(
            f"unsupported architecture {config.model_type!r}; kvcal supports {', '.join(supported_model_types())}"
        )
    return cls(model)


def adapter_for_config(config) -> ModelAdapter:
    """An adapter that can only undo and redo RoPE, built from a config alone (no weights loaded)."""
    import importlib

    from torch import nn

    text = config.get_text_config(decoder=True)
    if text.model_type not in ADAPTERS:
        raise ModelError(f"unsupported architecture {text.model_type!r}; kvcal supports {', '.join(supported_model_types())}")
    pkg = text.model_type.removesuffix("_text")
    module = importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}")
    names = [n for n in dir(module) if n.endswith("RotaryEmbedding") and n.lower().startswith(pkg.replace("_", ""))]
    rotary = getattr(module, min(names, key=len))(config=text)

    class RotaryHost(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = text
            self.model = nn.Module()
            self.model.rotary_emb = rotary

    return ADAPTERS[text.model_type](RotaryHost())


__all__ = ["ADAPTERS", "KVLayout", "ModelAdapter", "adapter_for", "adapter_for_config", "supported_model_types"]

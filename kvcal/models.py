"""Loading a causal LM from a local directory, with one-line errors for everything a user can get wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvcal.errors import ModelError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (fast and exact there), bf16 on GPU (as models are served)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_dir(model_dir: str | Path) -> Path:
    """Fail early, in one line, on a directory that cannot hold a local Hugging Face causal LM."""
    from kvcal.adapters import ADAPTERS, supported_model_types

    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist; pass a local Hugging Face model directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json; pass a local Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}); re-export the model") from None
    archs = cfg.get("architectures") or []
    model_type = cfg.get("text_config", {}).get("model_type") if "text_config" in cfg else cfg.get("model_type")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # The saved architecture says what the checkpoint is (a BERT encoder is not causal even though a causal
    # BERT class exists); only without one do we fall back on whether the family has a causal-LM class.
    if archs:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        raise ModelError(f"{path} holds a {', '.join(archs) or model_type}, not a causal LM; kvcal needs a *ForCausalLM model")
    if model_type not in ADAPTERS:
        raise ModelError(
            f"unsupported architecture {model_type!r} in {path}; kvcal supports {', '.join(supported_model_types())}"
        )
    return path


def load_model(model_dir: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from a local directory; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvcal shows its own progress; weight loading is quick and noisy
    path = check_model_dir(model_dir)
    dev = resolve_device(device) if isinstance(device, str) else device
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype or default_dtype(dev)
        ).to(dev)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the model in {path}: {first}") from None
    model.eval()
    return model, tokenizer

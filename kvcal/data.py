"""Where bundled models and corpora live, and how text files become token sequences."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import torch

from kvcal.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz")


def artifacts_root() -> Path:
    """The repository's ``artifacts/`` folder (override with ``KVCAL_ARTIFACTS``)."""
    env = os.environ.get("KVCAL_ARTIFACTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "artifacts"


def bundled_model(name: str = "kvcal-ref-llama") -> Path:
    """A reference model of the repository's ``artifacts/``; ``ModelError`` saying where it lives if absent.

    The models are not in the wheel (55 MB with the corpora): an installed, non-editable kvcal has none.
    """
    path = artifacts_root() / name
    if not (path / "config.json").is_file():
        from kvcal.errors import ModelError

        raise ModelError(
            f"the bundled reference model is not at {path}: it lives in the kvcal repository's artifacts/{name}; "
            "install from a clone with pip install -e . (or set KVCAL_ARTIFACTS), or pass MODEL_DIR"
        )
    return path


def bundled_corpus(split: str) -> Path:
    """``calib``, ``eval`` (committed, plain JSONL) or ``train`` (xz-compressed JSONL); ``DataError`` if absent."""
    name = "train.jsonl.xz" if split == "train" else f"{split}.jsonl"
    path = artifacts_root() / "corpus" / name
    if not path.is_file():
        raise DataError(
            f"the bundled {split} corpus is not at {path}: it lives in the kvcal repository's artifacts/corpus/{name}; "
            "install from a clone with pip install -e . (or set KVCAL_ARTIFACTS), or pass --data"
        )
    return path


def _read_jsonl(path: Path) -> list[str]:
    raw = lzma.decompress(path.read_bytes()) if path.name.endswith(".xz") else path.read_bytes()
    texts = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object with a \"text\" field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: no \"text\" string field; each JSONL line must be {{\"text\": ...}}")
        texts.append(row["text"])
    return texts


def load_texts(paths: list[str | Path]) -> list[str]:
    """Read .txt/.md/.rst files, directories of them (recursively) and .jsonl files with a "text" field."""
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p} does not exist; pass .txt/.md/.rst/.jsonl files or directories")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            name = f.name.lower()
            if name.endswith(JSONL_SUFFIXES):
                texts.extend(_read_jsonl(f))
            elif name.endswith(TEXT_SUFFIXES):
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
            elif not p.is_dir():
                raise DataError(f"{f}: unsupported data file type; use .txt, .md, .rst or .jsonl with a \"text\" field")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"no text found in {', '.join(map(str, paths))}; give files with content")
    return texts


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Texts tokenized and joined with the EOS token (when there is one) into one 1-D tensor.

    Stops once ``max_tokens`` are reached, so a huge corpus is never tokenized (or held) whole.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        # Texts are joined and cut into windows afterwards, so one being longer than the model's limit is fine.
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def token_windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, ``[n, seq_len]``, at most ``max_tokens`` in all."""
    stream = token_stream(tokenizer, texts, None if max_tokens is None else max(seq_len, max_tokens))
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(
            f"calibration data has {stream.numel()} tokens, fewer than one sequence of {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    return stream[: n * seq_len].view(n, seq_len)

"""The calibration artifact: one safetensors file whose metadata header is validated before it is trusted.

``kvcal.safetensors`` holds, per kind (keys ``k``, values ``v``) and PCA group ``g``: ``{kind}.{g}.mean``,
``{kind}.{g}.basis`` (only the columns some ratio uses), ``{kind}.{g}.eigenvalues`` and one
``{kind}.{g}.alloc.{ratio}`` table of (start, size, quantizer type) rows per ratio; plus the PyramidKV
layer weights. The safetensors metadata key ``kvcal`` is a JSON document with the format version, the model
fingerprint and the calibration settings; ``kvcal.json`` beside it is the same document, for people.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcal.adapters import KVLayout
from kvcal.codec.quantize import QUANT_TYPES, QuantGroup
from kvcal.errors import ArtifactError, RatioError

ARTIFACT_FORMAT = "kvcal-artifact"
ARTIFACT_VERSION = 1
ARTIFACT_FILE = "kvcal.safetensors"
SUMMARY_FILE = "kvcal.json"
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_commit_hash", "architectures",
}


def ratio_key(ratio: float) -> str:
    return f"{float(ratio):g}"


# --- fingerprint ------------------------------------------------------------------------------------------
def config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def attention_weights_hash(model) -> str:
    """sha256 of all attention parameters rounded to bf16, so fp32 and bf16 loads of one checkpoint agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if ".self_attn." in name:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model, layout: KVLayout) -> dict:
    cfg = model.config.get_text_config(decoder=True)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    return {
        "model_type": cfg.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "v_head_dim": layout.v_head_dim,
        "rotary_dim": layout.rotary_dim,
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
        "config_sha256": config_hash(cfg),
        "attention_sha256": attention_weights_hash(model),
    }


def fingerprint_mismatches(expected: dict, actual: dict) -> list[str]:
    keys = [k for k in expected if k != "architectures"]
    return [f"{k} (artifact {expected.get(k)!r}, model {actual.get(k)!r})" for k in keys if expected.get(k) != actual.get(k)]


# --- the artifact -------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    meta: dict
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    @property
    def layout(self) -> KVLayout:
        d = self.meta["layout"]
        return KVLayout(**{**d, "exact_layers": tuple(d["exact_layers"])})

    @property
    def groups(self) -> list[tuple[int, ...]]:
        return [tuple(g) for g in self.meta["groups"]]

    @property
    def ratios(self) -> list[float]:
        return [float(r) for r in self.meta["ratios"]]

    @property
    def fingerprint(self) -> dict:
        return self.meta["fingerprint"]

    def mean(self, kind: str, g: int) -> torch.Tensor:
        return self.tensors[f"{kind}.{g}.mean"]

    def basis(self, kind: str, g: int) -> torch.Tensor:
        return self.tensors[f"{kind}.{g}.basis"]

    def eigenvalues(self, kind: str, g: int) -> torch.Tensor:
        return self.tensors[f"{kind}.{g}.eigenvalues"]

    def allocation(self, kind: str, g: int, ratio: float) -> tuple[QuantGroup, ...]:
        rows = self.tensors[f"{kind}.{g}.alloc.{ratio_key(ratio)}"].tolist()
        return tuple(QuantGroup(int(s), int(n), QUANT_TYPES[int(t)]) for s, n, t in rows)

    def check_ratio(self, ratio: float) -> float:
        if ratio_key(ratio) not in {ratio_key(r) for r in self.ratios}:
            have = ", ".join(ratio_key(r) for r in self.ratios)
            raise RatioError(f"ratio {ratio_key(ratio)} is not in this artifact (it has {have}); recalibrate with --ratio {ratio_key(ratio)}")
        return float(ratio)

    def budget_weights(self) -> torch.Tensor:
        return self.tensors["pyramid.weights"].double()

    # --- io ------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write atomically: each file goes to a temporary name in ``out_dir`` and is renamed into place."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            meta_json = json.dumps(self.meta, sort_keys=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            _atomic_write(out / ARTIFACT_FILE, lambda p: save_file(tensors, str(p), metadata={"kvcal": meta_json}))
            _atomic_write(out / SUMMARY_FILE, lambda p: Path(p).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n"))
        except OSError as e:
            raise ArtifactError(f"cannot write the artifact to {out}: {e.strerror or e}; choose a writable --out") from None
        self.path = out / ARTIFACT_FILE
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if p.is_dir():
            p = p / ARTIFACT_FILE if (p / ARTIFACT_FILE).exists() else p / "kvcal" / ARTIFACT_FILE
        if not p.is_file():
            raise ArtifactError(f"no kvcal artifact at {path}; run `kvcal calibrate` on the model first")
        try:
            with safe_open(str(p), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("kvcal")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0]}); recalibrate") from None
        if raw_meta is None:
            raise ArtifactError(f"{p} has no kvcal metadata; it was not written by kvcal calibrate")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError:
            raise ArtifactError(f"{p} has corrupt kvcal metadata; recalibrate") from None
        art = cls(meta, tensors, p)
        art.validate()
        return art

    def validate(self) -> None:
        """Check the document and every tensor's shape before anything is used."""
        m = self.meta
        where = self.path or "artifact"
        if not isinstance(m, dict) or m.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{where} is not a kvcal artifact")
        version = m.get("format_version")
        if not isinstance(version, int) or version > ARTIFACT_VERSION:
            raise ArtifactError(f"{where} has artifact format version {version}; this kvcal reads up to {ARTIFACT_VERSION}, upgrade kvcal")
        try:
            layout = self.layout
            groups, ratios = self.groups, self.ratios
            for kind, hd in (("k", layout.head_dim), ("v", layout.v_head_dim)):
                for g, layers in enumerate(groups):
                    p = len(layers) * layout.num_kv_heads * hd
                    basis, mean = self.basis(kind, g), self.mean(kind, g)
                    if mean.shape != (p,) or basis.ndim != 2 or basis.shape[0] != p:
                        raise ArtifactError(f"{where}: {kind}.{g} basis/mean shapes do not match the layout; recalibrate")
                    for r in ratios:
                        groups_ = self.allocation(kind, g, r)
                        check_allocation(groups_, basis.shape[1])
            if self.tensors["pyramid.weights"].shape != (layout.num_layers,):
                raise ArtifactError(f"{where}: pyramid.weights has the wrong shape; recalibrate")
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ArtifactError(f"{where} is incomplete or inconsistent ({e}); recalibrate") from None

    def check_model(self, model, layout: KVLayout | None = None) -> None:
        """Refuse a model other than the one calibrated, naming the fields that differ."""
        from kvcal.adapters import adapter_for

        actual = model_fingerprint(model, layout or adapter_for(model).layout())
        diff = fingerprint_mismatches(self.fingerprint, actual)
        if diff:
            raise ArtifactError(f"artifact was made for another model: {'; '.join(diff)}")

    def stored_parameters(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if k.endswith((".mean", ".basis")))


def check_allocation(groups: tuple[QuantGroup, ...], rank: int) -> None:
    pos = 0
    for q in groups:
        if q.start != pos or q.size <= 0 or q.qtype not in QUANT_TYPES:
            raise ArtifactError("an allocation table is malformed; recalibrate")
        pos += q.size
    used = max((q.start + q.size for q in groups if q.qtype != "none"), default=0)
    if used > rank:
        raise ArtifactError("an allocation uses basis columns the artifact does not store; recalibrate")


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def allocation_table(groups: tuple[QuantGroup, ...]) -> torch.Tensor:
    return torch.tensor([[q.start, q.size, QUANT_TYPES.index(q.qtype)] for q in groups], dtype=torch.int32).reshape(-1, 3)


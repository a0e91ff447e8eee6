"""The calibration artifact: one safetensors file whose metadata header is validated before it is trusted.

``kvcal.safetensors`` holds, per kind (keys ``k``, values ``v``) and PCA group ``g``: ``{kind}.{g}.mean``,
``{kind}.{g}.basis`` (orthonormal columns in the metric's space, only those some ratio uses),
``{kind}.{g}.weight`` / ``.weight_inverse`` (the metric's per layer-and-head blocks, ``kvcal.fit.metric``),
``{kind}.{g}.eigenvalues`` and one ``{kind}.{g}.steps.{ratio}`` table per ratio of ``(step, family, scale, span)``
rows, one per basis column (step 0 = pruned; the rest is the calibrated quantizer and its symbol model, see
``kvcal.fit.steps``); plus the PyramidKV layer weights.
The safetensors metadata key ``kvcal`` is a JSON document with the format version, the model
fingerprint and the calibration settings; the metadata key ``kvcal_sha256`` is a sha256 over that document and
every tensor (name, dtype, shape, bytes, in name order), checked on every load.

The safetensors file *is* the artifact: it is written to a temporary name, fsynced, renamed into place and the
directory fsynced, so a crash leaves the old artifact or the new one. ``kvcal.json`` beside it is a summary for
people, derived from it and written after it; nothing ever reads it back (a missing, stale or edited summary
neither breaks nor alters loading). Its ``artifact_sha256`` field names the checksum it was written from.
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
from kvcal.errors import ArtifactError, RatioError

ARTIFACT_FORMAT = "kvcal-artifact"
ARTIFACT_VERSION = 2  # 2: codec v2 (metric weights, calibrated steps and symbol models)
ARTIFACT_FILE = "kvcal.safetensors"
SUMMARY_FILE = "kvcal.json"
CHECKSUM_KEY = "kvcal_sha256"  # safetensors metadata key of the content checksum
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
    """Every differing field with both values (the long form, shown by ``--verbose``)."""
    return [f"{k} (artifact {expected.get(k)!r}, model {actual.get(k)!r})" for k in _differing_fields(expected, actual)]


# How the one-line mismatch error names each fingerprint field.
FINGERPRINT_FIELD_NAMES = {
    "model_type": "model type", "num_layers": "layer count", "num_kv_heads": "KV head count", "head_dim": "head dim",
    "v_head_dim": "value head dim", "rotary_dim": "rotary dim", "rope": "RoPE settings", "config_sha256": "config",
    "attention_sha256": "attention weights",
}


def _differing_fields(expected: dict, actual: dict) -> list[str]:
    return [k for k in expected if k != "architectures" and expected.get(k) != actual.get(k)]


def fingerprint_error(expected: dict, actual: dict) -> str:
    """One short line naming the fields that differ, e.g. "... attention weights and config differ; ..."."""
    names = [FINGERPRINT_FIELD_NAMES.get(k, k) for k in _differing_fields(expected, actual)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (f"artifact was made for another model: {listed} differ{'s' if len(names) == 1 else ''}; "
            "pass --verbose for the values, or recalibrate for this model")


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

    def steps(self, kind: str, g: int, ratio: float) -> torch.Tensor:
        """``[r, 4]`` rows ``(step, family, scale, span)`` per basis column at ``ratio``; step 0 = pruned."""
        return self.tensors[f"{kind}.{g}.steps.{ratio_key(ratio)}"]

    def metric_weights(self, kind: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The metric's per (layer, head) blocks ``[blocks, d, d]`` and their inverses (``kvcal.fit.metric``)."""
        return self.tensors[f"{kind}.{g}.weight"], self.tensors[f"{kind}.{g}.weight_inverse"]

    def check_ratio(self, ratio: float) -> float:
        if ratio_key(ratio) not in {ratio_key(r) for r in self.ratios}:
            have = ", ".join(ratio_key(r) for r in self.ratios)
            raise RatioError(f"ratio {ratio_key(ratio)} is not in this artifact (it has {have}); recalibrate with --ratio {ratio_key(ratio)}")
        return float(ratio)

    def budget_weights(self) -> torch.Tensor:
        return self.tensors["pyramid.weights"].double()

    # --- io ------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write the safetensors file atomically (temp file, fsync, rename, directory fsync), then the summary.

        Temporary files a killed earlier save left in ``out_dir`` are removed first.
        """
        from safetensors.torch import save

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out)
            meta_json = json.dumps(self.meta, sort_keys=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            checksum = content_checksum(meta_json, tensors)
            metadata = {"kvcal": meta_json, CHECKSUM_KEY: checksum}
            # Serialized here and written by us: save_file would make its own hidden temp file that a kill leaves behind.
            payload = canonical_header(save(tensors, metadata=metadata))
            _atomic_write(out / ARTIFACT_FILE, lambda p: Path(p).write_bytes(payload))
            summary = {**self.meta, "artifact_sha256": checksum}
            _atomic_write(out / SUMMARY_FILE, lambda p: Path(p).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n"))
        except OSError as e:
            raise ArtifactError(f"cannot write the artifact to {out}: {e.strerror or e}; choose a writable --out") from None
        self.path = out / ARTIFACT_FILE
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read and verify ``kvcal.safetensors`` (never ``kvcal.json``): checksum, then document, then shapes."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if p.is_dir():
            p = p / ARTIFACT_FILE if (p / ARTIFACT_FILE).exists() else p / "kvcal" / ARTIFACT_FILE
        if not p.is_file():
            raise ArtifactError(f"no kvcal artifact at {path}; run `kvcal calibrate` on the model first")
        try:
            with safe_open(str(p), framework="pt") as f:
                file_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0]}); recalibrate") from None
        raw_meta = file_meta.get("kvcal")
        if raw_meta is None:
            raise ArtifactError(f"{p} has no kvcal metadata; it was not written by kvcal calibrate")
        verify_checksum(p, raw_meta, tensors, file_meta.get(CHECKSUM_KEY))
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
        if version < ARTIFACT_VERSION:
            raise ArtifactError(f"{where} has artifact format version {version} (codec v1); this kvcal reads version "
                                f"{ARTIFACT_VERSION}: recalibrate with `kvcal calibrate`")
        try:
            layout = self.layout
            groups, ratios = self.groups, self.ratios
            for kind, hd in (("k", layout.head_dim), ("v", layout.v_head_dim)):
                for g, layers in enumerate(groups):
                    p = len(layers) * layout.num_kv_heads * hd
                    basis, mean = self.basis(kind, g), self.mean(kind, g)
                    if mean.shape != (p,) or basis.ndim != 2 or basis.shape[0] != p:
                        raise ArtifactError(f"{where}: {kind}.{g} basis/mean shapes do not match the layout; recalibrate")
                    blocks = len(layers) * layout.num_kv_heads
                    for t in self.metric_weights(kind, g):
                        if t.shape != (blocks, hd, hd):
                            raise ArtifactError(f"{where}: {kind}.{g} metric weights have the wrong shape; recalibrate")
                    check_finite(where, f"{kind}.{g}", (basis, mean, *self.metric_weights(kind, g)))
                    for r in ratios:
                        check_step_table(where, f"{kind}.{g}.steps.{ratio_key(r)}", self.steps(kind, g, r), basis.shape[1])
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
            raise ArtifactError(fingerprint_error(self.fingerprint, actual), detail="; ".join(diff))

    def stored_parameters(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if k.endswith((".mean", ".basis")))


# The codes of one coordinate travel as int16 (see kvcal.codec.entropy.MAX_SPAN).
MAX_SPAN = (1 << 15) - 1


def check_finite(where, name: str, tensors) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ArtifactError(f"{where}: {name} holds non-finite numbers; recalibrate")


def check_step_table(where, name: str, table: torch.Tensor, rank: int) -> None:
    """Rows ``(step, family, scale, span)``: finite, step >= 0, family 0/1, scale > 0 and span 1..MAX_SPAN where kept."""
    if table.ndim != 2 or table.shape != (rank, 4):
        raise ArtifactError(f"{where}: {name} has shape {tuple(table.shape)}, expected ({rank}, 4); recalibrate")
    t = table.double()
    check_finite(where, name, (t,))
    kept = t[:, 0] > 0
    family, scale, span = t[kept, 1], t[kept, 2], t[kept, 3]
    ok = bool((t[:, 0] >= 0).all()) and bool(((family == 0) | (family == 1)).all()) and bool((scale > 0).all())
    ok = ok and bool(((span >= 1) & (span <= MAX_SPAN) & (span == span.round())).all())
    if not ok:
        raise ArtifactError(f"{where}: {name} is malformed; recalibrate")


# --- integrity and atomic writes ------------------------------------------------------------------------------
def content_checksum(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata document and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    h.update(b"kvcal-artifact-checksum-v1\0")
    h.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify_checksum(path: Path, meta_json: str, tensors: dict[str, torch.Tensor], stored: str | None) -> None:
    """Refuse a file whose metadata or tensor data no longer match the checksum written with them."""
    if not stored:
        raise ArtifactError(f"{path} has no content checksum (written by an older kvcal or edited); recalibrate")
    if content_checksum(meta_json, tensors) != stored:
        raise ArtifactError(f"{path} is corrupted (checksum mismatch); recalibrate")


def canonical_header(payload: bytes) -> bytes:
    """The safetensors bytes with the JSON header rewritten in sorted key order (space-padded to 8 bytes).

    safetensors orders metadata keys by hash, so with two keys the same artifact would get different bytes.
    """
    n = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload[8 + n :]


TEMP_PATTERNS = (f".{ARTIFACT_FILE}.*.tmp", f".{SUMMARY_FILE}.*.tmp")


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files an interrupted save left behind (kvcal's names only). Not for concurrent saves."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for tmp in directory.glob(pattern):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone is racy across threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write) -> None:
    """``write(tmp)``, fsync, mode ``0o666 & ~umask``, rename onto ``target``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)



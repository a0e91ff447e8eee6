"""``kvcal calibrate``: capture -> PCA -> bit allocation per ratio -> PyramidKV budgets -> artifact."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from kvcal import __version__
from kvcal.adapters import adapter_for
from kvcal.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, allocation_table, model_fingerprint, ratio_key
from kvcal.capture import CaptureSpec, capture_kv_statistics
from kvcal.data import bundled_corpus, bundled_model, load_texts, token_windows
from kvcal.errors import DataError
from kvcal.fit.bits import allocate_bits, budget_for_ratio, measure_distortions
from kvcal.fit.budgets import arithmetic_weights, attention_weights
from kvcal.fit.pca import fit_pca_basis
from kvcal.models import check_model_dir, load_model
from kvcal.recipe import Recipe, load_recipe


@dataclass
class CalibrationReport:
    artifact: Artifact
    path: Path
    seconds: float

    def summary(self) -> dict:
        m = self.artifact.meta
        return {
            "artifact": str(self.path),
            "model_type": m["fingerprint"]["model_type"],
            "seconds": round(self.seconds, 2),
            "tokens": m["calibration"]["tokens"],
            "sequences": m["calibration"]["sequences"],
            "pca_grouping": m["calibration"]["pca_grouping"],
            "overhead_percent": m["overhead"]["percent"],
            "ratios": m["allocations"],
        }


def pca_groups(coded_layers: tuple[int, ...], grouping: str) -> tuple[tuple[int, ...], ...]:
    if grouping == "per-layer":
        return tuple((layer,) for layer in coded_layers)
    return (tuple(coded_layers),)


def calibrate(
    model_dir: str | Path | None = None,
    data: list[str | Path] | None = None,
    recipe: Recipe | str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    model=None,
    tokenizer=None,
    **overrides,
) -> CalibrationReport:
    """Calibrate ``model_dir`` (default: the bundled reference model) and write its artifact atomically."""
    t0 = time.time()
    model_dir = Path(model_dir) if model_dir else bundled_model()
    # Everything a user can get wrong is checked before the (slow) model load.
    if model is None:
        check_model_dir(model_dir)
        model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config(decoder=True).model_type
    else:
        model_type = model.config.get_text_config(decoder=True).model_type
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, model_type, **overrides)
    texts = load_texts(data or [bundled_corpus("calib")])
    if model is None:
        model, tokenizer = load_model(model_dir, device)
    adapter = adapter_for(model)
    layout = adapter.layout()
    windows = token_windows(tokenizer, texts, recipe.seq_len, recipe.max_tokens)
    if windows.shape[0] < 2:
        raise DataError(
            f"calibration data gives {windows.shape[0]} sequence of {recipe.seq_len} tokens; kvcal needs at least 2 "
            "(one held out to measure quantization error): give more text"
        )
    data_hash = hashlib.sha256(windows.numpy().tobytes()).hexdigest()

    groups = pca_groups(layout.coded_layers, recipe.pca_grouping)
    spec = CaptureSpec(
        groups=groups, sink=recipe.sink, obs_window=recipe.obs_window,
        heldout_every=min(recipe.heldout_every, windows.shape[0]), heldout_tokens=recipe.heldout_tokens,
    )
    captured = capture_kv_statistics(model, adapter, windows, spec, recipe.batch_size, progress)

    tensors: dict[str, torch.Tensor] = {}
    allocations: dict[str, dict] = {ratio_key(r): {"k": [], "v": []} for r in recipe.ratios}
    stored_rank: dict[tuple[str, int], int] = {}
    fit_items = [(kind, g) for g in range(len(groups)) for kind in ("k", "v")]
    for kind, g in tqdm(fit_items, desc="fit", unit="basis", disable=not progress):
        basis = fit_pca_basis(captured.moments[(kind, g)], recipe.rank_cap)
        coords = basis.project(captured.heldout[(kind, g)].rows)
        table = measure_distortions(coords, tuple(recipe.group_sizes), tuple(recipe.quant_types))
        used = 0
        for r in recipe.ratios:
            alloc = allocate_bits(table, budget_for_ratio(basis.dim, r))
            tensors[f"{kind}.{g}.alloc.{ratio_key(r)}"] = allocation_table(alloc.groups)
            kept_rank = alloc.used_rank()
            used = max(used, kept_rank)
            counts: dict[str, int] = {}
            for q in alloc.groups:
                counts[q.qtype] = counts.get(q.qtype, 0) + q.size
            allocations[ratio_key(r)][kind].append({
                "bits_per_token": alloc.bits_per_token,
                "budget_bits": alloc.budget_bits,
                "expected_ratio": round(basis.dim * 16 / max(alloc.bits_per_token, 1), 3),
                "coordinates": counts,
                "used_rank": kept_rank,
                "explained_variance": round(float(basis.explained_variance()[kept_rank - 1]) if kept_rank else 0.0, 6),
                "heldout_mse": alloc.distortion / max(basis.dim, 1),
            })
        stored_rank[(kind, g)] = used
        tensors[f"{kind}.{g}.mean"] = basis.mean
        tensors[f"{kind}.{g}.basis"] = basis.basis[:, :used].contiguous()
        tensors[f"{kind}.{g}.eigenvalues"] = basis.eigenvalues.float()
        tensors[f"{kind}.{g}.total_variance"] = torch.tensor([basis.total_variance], dtype=torch.float64)

    entropy = captured.attention.mean_entropy()
    coded = list(layout.coded_layers)
    if recipe.pyramid_mode == "attention" and bool((captured.attention.count[coded] > 0).all()):
        w = attention_weights(entropy[coded], recipe.pyramid_temperature)
    else:
        w = arithmetic_weights(len(coded), recipe.pyramid_beta)
    weights = torch.zeros(layout.num_layers, dtype=torch.float64)
    weights[coded] = w
    tensors["pyramid.weights"] = weights.float()
    tensors["attention.entropy"] = entropy.float()

    model_params = sum(p.numel() for p in model.parameters())
    stored = sum(t.numel() for k, t in tensors.items() if k.endswith((".mean", ".basis")))
    meta = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "kvcal_version": __version__,
        "fingerprint": model_fingerprint(model, layout),
        "layout": {**layout.__dict__, "exact_layers": list(layout.exact_layers)},
        "groups": [list(g) for g in groups],
        "ratios": [float(r) for r in recipe.ratios],
        "allocations": allocations,
        "calibration": {
            "sink": recipe.sink, "window": recipe.window, "seq_len": recipe.seq_len,
            "tokens": captured.tokens, "sequences": captured.sequences,
            "heldout_tokens": {f"{k}{g}": int(r.rows.shape[0]) for (k, g), r in captured.heldout.items()},
            "data_sha256": data_hash, "recipe": recipe.source, "pca_grouping": recipe.pca_grouping,
            "rank_cap": recipe.rank_cap, "quant_types": list(recipe.quant_types), "group_sizes": list(recipe.group_sizes),
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "pyramid": {"mode": recipe.pyramid_mode, "beta": recipe.pyramid_beta,
                        "temperature": recipe.pyramid_temperature, "obs_window": recipe.obs_window},
        },
        "overhead": {"stored_parameters": stored, "model_parameters": model_params,
                     "percent": round(100.0 * stored / model_params, 4)},
    }
    artifact = Artifact(meta, tensors)
    artifact.validate()
    path = artifact.save(Path(out) if out else model_dir / "kvcal")
    return CalibrationReport(artifact, path, time.time() - t0)

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
from kvcal.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, model_fingerprint, ratio_key
from kvcal.capture import CaptureSpec, capture_kv_statistics
from kvcal.clitools import OutputError, check_output_dir
from kvcal.data import bundled_corpus, bundled_model, load_texts, token_windows
from kvcal.errors import ArtifactError, DataError
from kvcal.fit.budgets import arithmetic_weights, attention_weights
from kvcal.fit.metric import fit_metric
from kvcal.fit.pca import fit_pca_basis
from kvcal.fit.steps import StepAllocation, allocate_steps, measure_rate_distortion
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


KINDS = ("k", "v")


def budget_pools(keys: list[tuple[str, int]], budget: str) -> list[list[tuple[str, int]]]:
    """Which bases share one bit budget: all of them (``joint``) or those of one kind (``split``)."""
    if budget == "joint":
        return [keys]
    return [[key for key in keys if key[0] == kind] for kind in KINDS]


def allocation_summary(basis, alloc: StepAllocation) -> dict:
    kept = alloc.step > 0
    explained = float(basis.eigenvalues[kept[: basis.eigenvalues.numel()]].sum() / max(basis.total_variance, 1e-30))
    return {
        "bits_per_token": round(alloc.rate, 3),
        "expected_ratio": round(basis.dim * 16 / max(alloc.rate, 1e-9), 3),
        "kept": alloc.kept(),
        "used_rank": int(torch.nonzero(kept).max()) + 1 if alloc.kept() else 0,
        "explained_variance": round(explained, 6),
        "heldout_distortion": alloc.distortion,
        "gaussian": int(((alloc.family == 0) & kept).sum()),
        "laplace": int(((alloc.family == 1) & kept).sum()),
    }


def overhead_parameters(tensors: dict[str, torch.Tensor]) -> int:
    """The artifact's parameters that scale with the model (means, bases, metric weights): its overhead."""
    return sum(t.numel() for k, t in tensors.items() if k.endswith((".mean", ".basis", ".weight", ".weight_inverse")))


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
    out_dir = Path(out) if out else model_dir / "kvcal"
    try:  # an unwritable destination is reported now, not after minutes of capture and fitting
        check_output_dir(out_dir, "the output directory")
    except OutputError as err:
        raise ArtifactError(f"cannot write the artifact: {err}") from None
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
    # The attention-aware metric needs queries and o_proj as the cache's keys and values see them; an adapter
    # whose cache holds something else (MLA's latent) gets plain squared error, and the artifact says so.
    metric = recipe.metric if adapter.supports_attention_metric else "mse"
    spec = CaptureSpec(
        groups=groups, sink=recipe.sink, obs_window=recipe.obs_window,
        heldout_every=min(recipe.heldout_every, windows.shape[0]), heldout_tokens=recipe.heldout_tokens,
        query_moments=metric == "attention",
    )
    captured = capture_kv_statistics(model, adapter, windows, spec, recipe.batch_size, progress)

    tensors: dict[str, torch.Tensor] = {}
    bases, measured = {}, {}
    for g, layers in tqdm(list(enumerate(groups)), desc="fit", unit="group", disable=not progress):
        value_cov = captured.moments[("v", g)].head_covariances(layout.v_head_dim)  # only its per-head blocks are used
        weights = fit_metric(metric, adapter, layout, layers, value_cov, captured.queries)
        for kind in KINDS:
            basis = fit_pca_basis(captured.moments[(kind, g)], recipe.rank_cap, weights[kind])
            bases[(kind, g)] = basis
            # Measured where the moments live (the GPU when there is one), allocated on the host.
            heldout = captured.heldout[(kind, g)].rows.to(captured.moments[(kind, g)].sum.device)
            measured[(kind, g)] = measure_rate_distortion(basis.project(heldout)).to("cpu")
            captured.moments[(kind, g)] = None  # fitted: free its [p, p] sums (13 GB per kind at 12B shapes)

    allocations: dict[str, dict] = {}
    chosen: dict[tuple[str, int], dict[str, StepAllocation]] = {key: {} for key in bases}
    for r in recipe.ratios:
        for names in budget_pools(list(bases), recipe.budget):
            budget = sum(bases[key].dim for key in names) * 16 / r
            result = allocate_steps({f"{kind}.{g}": measured[(kind, g)] for kind, g in names}, budget)
            for kind, g in names:
                chosen[(kind, g)][ratio_key(r)] = result[f"{kind}.{g}"]
        allocations[ratio_key(r)] = {
            kind: [allocation_summary(bases[(kind, g)], chosen[(kind, g)][ratio_key(r)]) for g in range(len(groups))]
            for kind in KINDS
        }
    for (kind, g), basis in bases.items():
        # Only the columns some ratio keeps are stored.
        used = max((int(torch.nonzero(a.step > 0).max()) + 1 if a.kept() else 0) for a in chosen[(kind, g)].values())
        used = max(used, 1)  # keep one column so every tensor has a shape the validator can check
        tensors[f"{kind}.{g}.mean"] = basis.mean
        tensors[f"{kind}.{g}.basis"] = basis.basis[:, :used].contiguous()
        tensors[f"{kind}.{g}.weight"] = basis.weights.weight.float().contiguous()
        tensors[f"{kind}.{g}.weight_inverse"] = basis.weights.inverse.float().contiguous()
        tensors[f"{kind}.{g}.eigenvalues"] = basis.eigenvalues.float()
        tensors[f"{kind}.{g}.total_variance"] = torch.tensor([basis.total_variance], dtype=torch.float64)
        for key, alloc in chosen[(kind, g)].items():
            tensors[f"{kind}.{g}.steps.{key}"] = alloc.table()[:used].contiguous()

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
    stored = overhead_parameters(tensors)
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
            "rank_cap": recipe.rank_cap, "metric": metric, "budget": recipe.budget,
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "pyramid": {"mode": recipe.pyramid_mode, "beta": recipe.pyramid_beta,
                        "temperature": recipe.pyramid_temperature, "obs_window": recipe.obs_window},
        },
        "overhead": {"stored_parameters": stored, "model_parameters": model_params,
                     "percent": round(100.0 * stored / model_params, 4)},
    }
    artifact = Artifact(meta, tensors)
    artifact.validate()
    path = artifact.save(out_dir)
    return CalibrationReport(artifact, path, time.time() - t0)

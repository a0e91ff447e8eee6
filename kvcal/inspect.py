"""``kvcal inspect``: what a calibration artifact holds, per ratio, read from its tensors.

Kept coordinates, bits per token and kept variance are recomputed from the step tables (each kept coordinate's
bits are the entropy of its calibrated symbol model) and the eigenvalues, not copied from the summary
document, so the report describes exactly what the codec uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcal.artifact import Artifact, ratio_key
from kvcal.fit.budgets import pyramid_budgets
from kvcal.fit.symbols import symbol_pmf
from kvcal.plotting import pyplot, save_figure

KINDS = ("k", "v")


@dataclass(frozen=True)
class BasisAllocation:
    """One PCA basis (kind ``k``/``v``, group ``g``) at one ratio."""

    kind: str
    group: int
    layers: list[int]
    dim: int  # length of one token's vector for this group
    rank: int  # PCA coordinates that exist (dim, or fewer with a rank cap)
    coordinates: dict[str, int]  # kept as a Gaussian / Laplace symbol model, or pruned; sums to rank
    bits_per_token: float  # entropy of the kept coordinates' symbol models: what ANS spends per token
    expected_ratio: float  # 16 * dim / bits_per_token
    used_rank: int  # highest kept coordinate + 1
    explained_variance: float  # fraction of this basis's (weighted) variance in the kept coordinates


@dataclass(frozen=True)
class RatioSummary:
    ratio: float
    bits_per_token: float  # all bases together
    expected_ratio: float
    bases: list[BasisAllocation]


@dataclass
class ArtifactSummary:
    path: str
    file_bytes: int
    fingerprint: dict
    calibration: dict
    overhead: dict
    layout: dict
    groups: list[list[int]]
    ratios: list[RatioSummary]
    budget_weights: list[float]  # per layer; 0 for layers kept exact
    example_budgets: dict[str, list[int | None]]  # ratio -> middle tokens per layer at the calibration length
    example_middle_tokens: int

    def to_json(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        fp, cal, ov = self.fingerprint, self.calibration, self.overhead
        lines = [
            f"kvcal artifact: {self.path} ({self.file_bytes:,} bytes)",
            f"model: {fp['model_type']} ({', '.join(fp.get('architectures', []))}), {fp['num_layers']} layers, "
            f"{fp['num_kv_heads']} KV heads, head dims {fp['head_dim']}/{fp['v_head_dim']}",
            f"fingerprint: config {fp['config_sha256'][:16]}…, attention weights {fp['attention_sha256'][:16]}…",
            f"calibration: {cal.get('tokens', '?'):,} tokens in {cal.get('sequences', '?')} sequences of {cal.get('seq_len')}; "
            f"sink {cal.get('sink')}, window {cal.get('window')}; grouping {cal.get('pca_grouping')}; "
            f"recipe {cal.get('recipe')}; data sha256 {str(cal.get('data_sha256', ''))[:16]}…",
            f"overhead: {ov['stored_parameters']:,} stored parameters = {ov['percent']:.3f}% of the model's {ov['model_parameters']:,}",
            "",
            f"{'ratio':>6} {'basis':>6} {'dim':>6} {'bits/tok':>9} {'expected':>9} {'expl.var':>9}  coordinates",
        ]
        for r in self.ratios:
            for b in r.bases:
                coords = " ".join(f"{t}:{n}" for t, n in b.coordinates.items() if n)
                lines.append(f"{ratio_key(r.ratio):>6} {b.kind + str(b.group):>6} {b.dim:>6} {b.bits_per_token:>9.1f} "
                             f"{b.expected_ratio:>8.2f}x {b.explained_variance:>9.4f}  {coords}")
            lines.append(f"{ratio_key(r.ratio):>6} {'all':>6} {'':>6} {r.bits_per_token:>9.1f} {r.expected_ratio:>8.2f}x")
        lines.append("")
        lines.append("PyramidKV budget weights per layer: " + " ".join(f"{w:.3f}" for w in self.budget_weights))
        lines.append(f"example budgets (middle tokens kept per layer of {self.example_middle_tokens}, eviction at equal memory):")
        for ratio, budgets in self.example_budgets.items():
            lines.append(f"  ratio {ratio:>5}: " + " ".join("exact" if b is None else str(b) for b in budgets))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        return plot_artifact(self, path)


def coordinate_bits(artifact: Artifact, kind: str, g: int, ratio: float) -> torch.Tensor:
    """Bits per token each stored coordinate costs at ``ratio``: its symbol model's entropy (0 where pruned)."""
    table = artifact.steps(kind, g, ratio).double()
    bits = torch.zeros(table.shape[0], dtype=torch.float64)
    for i in torch.nonzero(table[:, 0] > 0).flatten().tolist():
        family, scale, span = table[i, 1], table[i, 2], table[i, 3]
        p = symbol_pmf(family, scale, torch.arange(-int(span), int(span) + 1), span)
        bits[i] = float(-(p * torch.log2(p)).sum())
    return bits


def basis_allocation(artifact: Artifact, kind: str, g: int, ratio: float) -> BasisAllocation:
    table = artifact.steps(kind, g, ratio).double()
    dim = artifact.basis(kind, g).shape[0]
    eig = artifact.eigenvalues(kind, g).double()
    rank = eig.numel()
    kept = torch.nonzero(table[:, 0] > 0).flatten()
    laplace = int((table[kept, 1] == 1).sum())
    counts = {"gaussian": len(kept) - laplace, "laplace": laplace, "pruned": rank - len(kept)}
    bits = float(coordinate_bits(artifact, kind, g, ratio).sum())
    used = int(kept.max()) + 1 if len(kept) else 0
    total_key = f"{kind}.{g}.total_variance"
    total = float(artifact.tensors[total_key]) if total_key in artifact.tensors else float(eig.sum())
    kept_var = float(eig[kept].sum()) / total if total > 0 else 0.0
    return BasisAllocation(kind, g, list(artifact.groups[g]), dim, rank, counts, round(bits, 3),
                           round(16.0 * dim / bits, 4) if bits else float("inf"), used, round(min(kept_var, 1.0), 6))


def explained_variance_curve(artifact: Artifact, kind: str, g: int) -> torch.Tensor:
    """Cumulative fraction of variance kept by the first 1..rank coordinates."""
    eig = artifact.eigenvalues(kind, g).double()
    total_key = f"{kind}.{g}.total_variance"
    total = float(artifact.tensors[total_key]) if total_key in artifact.tensors else float(eig.sum())
    return (eig.cumsum(0) / max(total, 1e-30)).clamp(max=1.0)


def example_budgets(artifact: Artifact, ratio: float) -> tuple[list[int | None], int]:
    """Middle tokens each layer keeps at ``ratio`` for a calibration-length sequence (None: layer kept exact)."""
    cal, layout = artifact.meta["calibration"], artifact.layout
    middle = max(0, cal["seq_len"] - cal["sink"] - cal["window"])
    coded = list(layout.coded_layers)
    per_layer = min(middle, round(middle / ratio))
    weights = artifact.budget_weights()[coded]
    split = pyramid_budgets(per_layer * len(coded), weights, min_tokens=1 if per_layer >= 1 else 0, max_tokens=middle)
    budgets: list[int | None] = [None] * layout.num_layers
    for layer, b in zip(coded, split):
        budgets[layer] = b
    return budgets, middle


def inspect_artifact(path: str | Path) -> ArtifactSummary:
    """Summarise the artifact at ``path`` (an artifact directory or file, or a model directory holding ``kvcal/``)."""
    artifact = Artifact.load(path)
    ratios = []
    for r in artifact.ratios:
        bases = [basis_allocation(artifact, kind, g, r) for kind in KINDS for g in range(len(artifact.groups))]
        bits = sum(b.bits_per_token for b in bases)
        dims = sum(b.dim for b in bases)
        ratios.append(RatioSummary(r, bits, round(16.0 * dims / bits, 4) if bits else float("inf"), bases))
    budgets, middle = {}, 0
    for r in artifact.ratios:
        budgets[ratio_key(r)], middle = example_budgets(artifact, r)
    file_path = Path(artifact.path)
    return ArtifactSummary(
        path=str(file_path), file_bytes=file_path.stat().st_size, fingerprint=artifact.fingerprint,
        calibration=artifact.meta["calibration"], overhead=artifact.meta["overhead"], layout=artifact.meta["layout"],
        groups=[list(g) for g in artifact.groups], ratios=ratios,
        budget_weights=[round(float(w), 6) for w in artifact.budget_weights()], example_budgets=budgets,
        example_middle_tokens=middle,
    )


def bits_grid(artifact: Artifact, kind: str, ratio: float) -> torch.Tensor:
    """Bits per token of every coordinate at ``ratio`` (groups concatenated; 0 = pruned)."""
    return torch.cat([coordinate_bits(artifact, kind, g, ratio) for g in range(len(artifact.groups))])


def plot_artifact(summary: ArtifactSummary, path: str | Path) -> Path:
    """Bits per coordinate for K and V per ratio, explained-variance curves, per-layer budgets."""
    plt = pyplot()

    artifact = Artifact.load(summary.path)
    ratios = artifact.ratios
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    grids = {kind: torch.stack([bits_grid(artifact, kind, r) for r in ratios]).numpy() for kind in KINDS}
    top = max(float(g.max()) for g in grids.values()) or 1.0
    for ax, kind in zip(axes[0], KINDS):
        shown = grids[kind].copy()
        shown[shown == 0] = float("nan")  # pruned coordinates stay blank
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=top)
        ax.set_yticks(range(len(ratios)), [f"{ratio_key(r)}x" for r in ratios])
        ax.set_xlabel("PCA coordinate (by decreasing weighted variance; groups concatenated); blank = pruned")
        ax.set_ylabel("target ratio")
        ax.set_title(f"{'keys' if kind == 'k' else 'values'}: bits per token per coordinate")
        fig.colorbar(im, ax=ax, label="bits / token")
    ax = axes[1][0]
    for kind in KINDS:
        for g in range(len(artifact.groups)):
            curve = explained_variance_curve(artifact, kind, g).numpy()
            label = f"{kind}{g}" if len(artifact.groups) > 1 else ("keys" if kind == "k" else "values")
            line, = ax.plot(range(1, len(curve) + 1), curve, label=label)
            for r in summary.ratios:
                b = next(b for b in r.bases if b.kind == kind and b.group == g)
                if b.used_rank:
                    ax.plot(b.used_rank, curve[b.used_rank - 1], "o", color=line.get_color(), markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("coordinates kept (dots: used rank at each ratio)")
    ax.set_ylabel("explained variance")
    ax.set_title("explained-variance curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1][1]
    layers = range(len(summary.budget_weights))
    ax.bar(layers, summary.budget_weights, color="#bbbbbb", label="weight")
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("PyramidKV budget weight")
    twin = ax.twinx()
    for ratio, budgets in summary.example_budgets.items():
        twin.plot([i for i, b in enumerate(budgets) if b is not None], [b for b in budgets if b is not None],
                  marker=".", label=f"{ratio}x")
    twin.set_ylabel(f"middle tokens kept (of {summary.example_middle_tokens})")
    twin.set_yscale("log")
    twin.legend(fontsize=7, ncol=2)
    ax.set_title("per-layer eviction budgets")
    fig.suptitle(f"{summary.fingerprint['model_type']} artifact: {Path(summary.path).parent}")
    fig.tight_layout()
    return save_figure(fig, path)


def summary_json(summary: ArtifactSummary) -> str:
    return json.dumps(summary.to_json(), indent=2)

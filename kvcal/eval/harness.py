"""The rate–quality harness: every cache method, on the same windows, against the uncompressed cache.

For each text window the prefix is prefilled once (its last token held back), every method turns that cache
into the one the model continues from, and the continuation is teacher-forced through it at true positions:
every scored prediction goes through the method's cache. The needle probe does the same on its contexts.
Both controls are always measured: the full cache (``uncompressed``) and the middle evicted (sink + window
only, no budget). Ratios compare the middle tokens only (see ``kvcal.eval.methods.base``) and aggregate bytes
over every cache a method compressed (perplexity windows and needle contexts).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcal.adapters import adapter_for
from kvcal.artifact import Artifact
from kvcal.capture import last_queries
from kvcal.data import token_stream
from kvcal.errors import ArtifactError, DataError
from kvcal.eval.intervals import accuracy_delta_interval, ppl_delta_interval
from kvcal.eval.methods import CacheMethod, MethodContext, Prefilled, expand_method_names, get_method, method_names
from kvcal.eval.methods.eviction import StreamingLLM
from kvcal.eval.methods.ragged import is_ragged, ragged_attention
from kvcal.eval.methods.transform import KvtcPyramidKV
from kvcal.eval.retrieval import NeedleProbe, NeedleTrial
from kvcal.eval.scoring import continue_from, prefill
from kvcal.plotting import pyplot, save_figure

DEFAULT_RATIOS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# The headline's quality bar: perplexity within 1% of the full cache, needle accuracy within one point.
MAX_PPL_DELTA_PCT = 1.0
MAX_RETRIEVAL_DROP = 0.01
# Needle tokens scored per trial (the needle less its repeated prompt): one point of accuracy is
# needles * NEEDLE_TOKENS_PER_TRIAL / 100 tokens.
NEEDLE_TOKENS_PER_TRIAL = NeedleProbe.needle_len - NeedleProbe.prompt_len


@dataclass(frozen=True)
class EvalSettings:
    prefix: int = 768  # tokens before the continuation; the last one is fed after the method
    continuation: int = 128
    sink: int = 4
    window: int = 128
    # Enough that one point of needle accuracy is ~30 tokens and a 1% perplexity change is resolved (see the
    # intervals each row reports).
    windows: int = 64  # perplexity windows drawn evenly from the data
    needles: int = 128  # needle probe trials (0: no retrieval)
    needle_context: int = 1024
    obs_window: int = 32  # last prefill queries that score tokens for eviction
    seed: int = 0

    def validate(self) -> EvalSettings:
        if self.continuation < 1 or self.windows < 0 or self.needles < 0:
            raise DataError("--continuation must be >= 1, --windows and --needles >= 0")
        if self.windows == 0 and self.needles == 0:
            raise DataError("nothing to measure: --windows and --needles are both 0")
        for name, length in (("--prefix", self.prefix), ("the needle context", self.needle_context)):
            if length - 1 <= self.sink + self.window:
                raise DataError(f"{name} ({length} tokens) leaves no middle tokens after sink {self.sink} and window "
                                f"{self.window}; lengthen it or shrink --window")
        return self

    @property
    def needle_point_tokens(self) -> float:
        """Needle tokens behind one point (0.01) of needle accuracy."""
        return self.needles * NEEDLE_TOKENS_PER_TRIAL / 100.0


@dataclass(frozen=True)
class RunSpec:
    method: CacheMethod
    ratio: float | None

    @property
    def label(self) -> str:
        return self.method.name if self.ratio is None else f"{self.method.name}@{self.ratio:g}"

    def detail(self, ctx: MethodContext) -> str:
        if isinstance(self.method, KvtcPyramidKV):
            codec_ratio, keep = self.method.plan(ctx, self.ratio)
            return f"codec {codec_ratio:g}x, keeps {keep:.2f} of middle"
        return ""


@dataclass
class Tally:
    nll: float = 0.0
    tokens: int = 0
    hits: int = 0
    needle_tokens: int = 0
    stored_bytes: int = 0
    bf16_bytes: int = 0
    seconds: float = 0.0
    # Per-window NLL sums and per-trial hits, in evaluation order: what paired comparisons between methods
    # (bootstrap intervals, agreement checks) need beyond the totals.
    window_nll: list[float] = field(default_factory=list)
    trial_hits: list[int] = field(default_factory=list)

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll / self.tokens) if self.tokens else None

    @property
    def accuracy(self) -> float | None:
        return self.hits / self.needle_tokens if self.needle_tokens else None

    @property
    def ratio(self) -> float | None:
        return self.bf16_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass(frozen=True)
class EvalRow:
    method: str
    target_ratio: float | None  # None for fixed-rate methods
    measured_ratio: float | None  # bf16 middle bytes / stored middle bytes
    ppl: float | None
    ppl_delta_pct: float | None  # vs the uncompressed cache on the same windows
    retrieval: float | None  # needle token accuracy
    stored_bytes: int
    bf16_bytes: int
    seconds: float
    detail: str = ""
    window_nll: tuple[float, ...] = ()  # NLL summed over each perplexity window's continuation
    trial_hits: tuple[int, ...] = ()  # needle tokens right in each trial
    # 95% paired-bootstrap intervals (over windows, over trials) of Δppl % and of the needle accuracy's
    # difference from the full cache's (``kvcal.eval.intervals``); None where the measure was not run.
    ppl_delta_ci: tuple[float, float] | None = None
    retrieval_delta_ci: tuple[float, float] | None = None


@dataclass
class EvalReport:
    model: str
    artifact: str | None
    settings: EvalSettings
    ppl_uncompressed: float | None
    ppl_evicted: float | None
    retrieval_full: float | None
    retrieval_evicted: float | None
    rows: list[EvalRow] = field(default_factory=list)

    def passes(self, row: EvalRow) -> bool:
        """The headline's bar, on whichever measures were run."""
        if row.measured_ratio is None:
            return False
        if row.ppl_delta_pct is not None and row.ppl_delta_pct > MAX_PPL_DELTA_PCT:
            return False
        if row.retrieval is not None and row.retrieval < self.retrieval_full - MAX_RETRIEVAL_DROP:
            return False
        return True

    def controls_discriminate(self) -> dict[str, bool | None]:
        """Whether evicting the middle fails each measure's bar; if it does not, that measure cannot tell
        a good compression of the middle from none at all (the model does not use its middle)."""
        ppl = None if self.ppl_uncompressed is None else 100.0 * (self.ppl_evicted / self.ppl_uncompressed - 1) > MAX_PPL_DELTA_PCT
        retrieval = None if self.retrieval_full is None else self.retrieval_full - self.retrieval_evicted > MAX_RETRIEVAL_DROP
        return {"ppl": ppl, "retrieval": retrieval}

    def headline(self) -> dict[str, float | None]:
        """Per method: the highest measured ratio whose row passes the quality bar (None if none does)."""
        best: dict[str, float | None] = {}
        for row in self.rows:
            best.setdefault(row.method, None)
            if self.passes(row) and (best[row.method] is None or row.measured_ratio > best[row.method]):
                best[row.method] = row.measured_ratio
        return best

    def first_failing(self) -> dict[str, float | None]:
        """Per method: the lowest measured ratio whose row fails the quality bar (None if every row passes).

        Beside the headline it brackets where the method crosses the bar; below the headline it shows a
        curve that is not monotone within the measurement's noise."""
        worst: dict[str, float | None] = {}
        for row in self.rows:
            worst.setdefault(row.method, None)
            if (row.measured_ratio is not None and not self.passes(row)
                    and (worst[row.method] is None or row.measured_ratio < worst[row.method])):
                worst[row.method] = row.measured_ratio
        return worst

    def retrieval_delta(self, row: EvalRow) -> float | None:
        """The row's needle accuracy minus the full cache's."""
        return None if row.retrieval is None or self.retrieval_full is None else row.retrieval - self.retrieval_full

    def with_intervals(self) -> EvalReport:
        """This report with every row's intervals filled in (rows that have them keep them), from the per-window
        NLLs and per-trial hits against the ``uncompressed`` row's; seeded by ``settings.seed``."""
        base = next((r for r in self.rows if r.method == "uncompressed"), None)
        if base is None:
            return self
        rows = []
        for r in self.rows:
            ppl_ci, ret_ci = r.ppl_delta_ci, r.retrieval_delta_ci
            if ppl_ci is None and r.window_nll and len(r.window_nll) == len(base.window_nll):
                ppl_ci = ppl_delta_interval(r.window_nll, base.window_nll, self.settings.continuation,
                                            seed=self.settings.seed).as_pair()
            if ret_ci is None and r.trial_hits and len(r.trial_hits) == len(base.trial_hits):
                ret_ci = accuracy_delta_interval(r.trial_hits, base.trial_hits, NEEDLE_TOKENS_PER_TRIAL,
                                                 seed=self.settings.seed).as_pair()
            rows.append(replace(r, ppl_delta_ci=ppl_ci, retrieval_delta_ci=ret_ci))
        return replace(self, rows=rows)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "artifact": self.artifact,
            "settings": asdict(self.settings),
            "controls": {
                "ppl_uncompressed": self.ppl_uncompressed,
                "ppl_middle_evicted": self.ppl_evicted,
                "retrieval_full_cache": self.retrieval_full,
                "retrieval_middle_evicted": self.retrieval_evicted,
            },
            "rows": [asdict(r) for r in self.rows],
            "headline": {
                "criteria": {"max_ppl_delta_pct": MAX_PPL_DELTA_PCT, "max_retrieval_drop": MAX_RETRIEVAL_DROP,
                             "measures": [m for m, v in (("ppl", self.ppl_uncompressed), ("retrieval", self.retrieval_full))
                                          if v is not None]},
                "best_ratio_by_method": self.headline(),
                "first_failing_ratio_by_method": self.first_failing(),
                "needle_point_tokens": self.settings.needle_point_tokens,
                "interval": "95% paired bootstrap over windows (ppl) and trials (needle), "
                            f"seed {self.settings.seed}",
                "controls_discriminate": self.controls_discriminate(),
            },
        }

    @classmethod
    def from_json(cls, doc: dict) -> EvalReport:
        """The report ``to_json`` wrote (the headline is recomputed, not read)."""
        c = doc["controls"]
        rows = [EvalRow(**{**r, "window_nll": tuple(r.get("window_nll", ())), "trial_hits": tuple(r.get("trial_hits", ())),
                           **{k: None if r.get(k) is None else tuple(r[k]) for k in ("ppl_delta_ci", "retrieval_delta_ci")}})
                for r in doc["rows"]]
        return cls(doc["model"], doc.get("artifact"), EvalSettings(**doc["settings"]), c["ppl_uncompressed"],
                   c["ppl_middle_evicted"], c["retrieval_full_cache"], c["retrieval_middle_evicted"], rows)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        s = self.settings
        lines = [f"kvcal eval: {self.model}" + (f" (artifact {self.artifact})" if self.artifact else "")]
        lines.append(f"perplexity: {s.windows} windows of {s.prefix} + {s.continuation} tokens; needle probe: "
                     f"{s.needles} trials of {s.needle_context} tokens (1 point = {s.needle_point_tokens:g} tokens); "
                     f"sink {s.sink}, window {s.window} kept exact; [95% paired bootstrap intervals]")
        lines.append(f"controls: ppl full {_fmt(self.ppl_uncompressed, '.3f')}, middle evicted {_fmt(self.ppl_evicted, '.3f')}; "
                     f"needle accuracy full {_fmt(self.retrieval_full, '.3f')}, middle evicted {_fmt(self.retrieval_evicted, '.3f')}")
        lines.append("")
        lines.append(f"{'method':<22}{'target':>8}{'measured':>10}{'ppl':>10}{'Δppl %':>10}{'[95% CI]':>18}"
                     f"{'needle':>8}{'Δneedle':>9}{'[95% CI]':>18}  detail")
        for r in self.rows:
            lines.append(f"{r.method:<22}{_fmt(r.target_ratio, 'g'):>8}{_fmt(r.measured_ratio, '.2f'):>10}"
                         f"{_fmt(r.ppl, '.3f'):>10}{_fmt(r.ppl_delta_pct, '+.2f'):>10}{fmt_ci(r.ppl_delta_ci, '+.2f'):>18}"
                         f"{_fmt(r.retrieval, '.3f'):>8}{_fmt(self.retrieval_delta(r), '+.3f'):>9}"
                         f"{fmt_ci(r.retrieval_delta_ci, '+.3f'):>18}  {r.detail}")
        lines.append("")
        lines.append(f"highest measured ratio with Δppl <= {MAX_PPL_DELTA_PCT:g}% and needle accuracy within "
                     f"{MAX_RETRIEVAL_DROP:g} of the full cache (and the lowest measured ratio that fails it):")
        failing = self.first_failing()
        for method, ratio in self.headline().items():
            lines.append(f"  {method:<22}{_fmt(ratio, '.2f') + 'x' if ratio else 'none':>10}"
                         f"   first failing {_fmt(failing[method], '.2f') + 'x' if failing[method] else 'none'}")
        warning = self.control_warning()
        if warning:
            lines.append(warning)
        return "\n".join(lines)

    def control_warning(self) -> str:
        """A sentence when a measure's own control shows it cannot judge the middle tokens; else ''."""
        blind = [name for name, ok in self.controls_discriminate().items() if ok is False]
        if not blind:
            return ""
        return (f"warning: evicting the whole middle already passes the {' and '.join(blind)} bar, so "
                f"{'these measures' if len(blind) > 1 else 'this measure'} cannot tell how well a method keeps the "
                "middle tokens (the model hardly uses them); read the headline accordingly")

    def plot(self, path: str | Path) -> Path:
        return plot_rate_quality([self], path)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_ci(ci: Sequence[float] | None, spec: str) -> str:
    """``[lo, hi]`` or ``-``."""
    return "-" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


# Fixed per-method styles, so a method looks the same in every figure; KVTC stands out.
METHOD_STYLES: dict[str, dict] = {
    "uncompressed": dict(color="black", marker="*", markersize=9),
    "fp8": dict(color="#8c564b", marker="v"),
    "int8": dict(color="#bcbd22", marker="^"),
    "int4": dict(color="#e377c2", marker="<"),
    "kivi2": dict(color="#7f7f7f", marker=">"),
    "pca": dict(color="#17becf", marker="s", linestyle="--"),
    "streamingllm": dict(color="#9467bd", marker="x", linestyle=":"),
    "snapkv": dict(color="#2ca02c", marker="o", linestyle=":"),
    "pyramidkv": dict(color="#98df8a", marker="D", linestyle="-.", markersize=4),
    "kvtc": dict(color="#d62728", marker="o", linewidth=2.2),
    "kvtc+pyramidkv": dict(color="#ff7f0e", marker="P", linewidth=1.6),
    # Codec v1's KVTC (a saved run), beside the current codec's: same colour, hollow markers, dashed.
    "kvtc-v1": dict(color="#d62728", marker="o", markerfacecolor="none", linestyle="--", linewidth=1.4),
    "h2o": dict(color="#1f77b4", marker="h", linestyle=":"),
    "turboquant-2.5": dict(color="#aec7e8", marker="d"),
    "turboquant-3.5": dict(color="#c5b0d5", marker="d"),
    "turboquant-prod-2.5": dict(color="#aec7e8", marker="X"),
    "turboquant-prod-3.5": dict(color="#c5b0d5", marker="X"),
    # kvpress's presses (scripts/bench_vs_kvpress.py): the colour of kvcal's namesake, hollow markers, dashed.
    "kvpress-streamingllm": dict(color="#9467bd", marker="x", linestyle="--", linewidth=1),
    "kvpress-snapkv": dict(color="#2ca02c", marker="o", markerfacecolor="none", linestyle="--", linewidth=1),
    "kvpress-pyramidkv": dict(color="#98df8a", marker="D", markerfacecolor="none", linestyle="--", linewidth=1),
    "kvpress-knorm": dict(color="#393b79", marker="s", markerfacecolor="none", linestyle="--", linewidth=1),
    "kvpress-snapkv-matched": dict(color="#2ca02c", marker="+", linestyle="-.", linewidth=1),
    "kvpress-quanto4": dict(color="#e377c2", marker="<", markerfacecolor="none"),
    "kvpress-quanto2": dict(color="#7f7f7f", marker=">", markerfacecolor="none"),
}


def method_style(method: str) -> dict:
    return METHOD_STYLES.get(method, dict(marker="o"))


def plot_rate_quality(reports: Sequence[EvalReport], path: str | Path,
                      extra_rows: Mapping[str, Sequence[EvalRow]] | None = None) -> Path:
    """Δppl % and needle accuracy against measured ratio (log x), one line per method, one column per report.

    ``extra_rows`` adds series to a report's column, keyed by the report's model directory name (e.g. codec v1's
    KVTC rows from a saved run, renamed ``kvtc-v1``)."""
    plt = pyplot()

    fig, axes = plt.subplots(2, len(reports), figsize=(6.5 * len(reports), 9), squeeze=False)
    for col, report in enumerate(reports):
        top, bottom = axes[0][col], axes[1][col]
        by_method: dict[str, list[EvalRow]] = {}
        for r in [*report.rows, *(extra_rows or {}).get(Path(report.model).name, ())]:
            if r.measured_ratio is not None:
                by_method.setdefault(r.method, []).append(r)
        for method, rows in by_method.items():
            rows = sorted(rows, key=lambda r: r.measured_ratio)
            x = [r.measured_ratio for r in rows]
            style = dict(label=method, **method_style(method))
            if rows[0].ppl_delta_pct is not None:
                top.plot(x, [r.ppl_delta_pct for r in rows], **style)
            if rows[0].retrieval is not None:
                bottom.plot(x, [r.retrieval for r in rows], **style)
        top.axhline(MAX_PPL_DELTA_PCT, color="grey", linestyle=":", linewidth=1)
        top.set_yscale("symlog", linthresh=1.0)
        top.set_ylabel("perplexity increase vs full cache (%)")
        top.set_title(Path(report.model).name or report.model)
        if report.retrieval_full is not None:
            bottom.axhline(report.retrieval_full, color="black", linestyle="--", linewidth=1, label="full cache")
            bottom.axhline(report.retrieval_evicted, color="red", linestyle="--", linewidth=1, label="middle evicted")
        bottom.set_ylabel("needle token accuracy")
        bottom.set_ylim(-0.02, 1.02)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xlabel("measured compression ratio of the middle tokens (bf16 / stored)")
            ax.grid(True, which="both", alpha=0.3)
    # One legend for the whole figure, below it, so no curve hides behind it.
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = min(6, max(1, len(handles)))
    fig.tight_layout(rect=(0, 0.02 * math.ceil(len(handles) / ncol), 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    return save_figure(fig, path)


# --- running ------------------------------------------------------------------------------------------------
def plan_runs(methods: Sequence[str] | None, ratios: Sequence[float] | None, ctx: MethodContext,
              method_ratios: Mapping[str, Sequence[float]] | None = None) -> list[RunSpec]:
    """Every (method, ratio) to run, checked before any work; ``uncompressed`` always comes first (the baseline).

    ``method_ratios`` gives some methods their own ratios instead of ``ratios`` (e.g. a denser grid for KVTC)."""
    explicit = bool(methods)
    names = expand_method_names(methods) if explicit else method_names()
    chosen = [get_method(n) for n in names]
    if ctx.artifact is None:
        needing = [m.name for m in chosen if m.needs_artifact]
        if needing and not explicit:
            free = ", ".join(m.name for m in chosen if not m.needs_artifact)
            raise ArtifactError(f"no calibration artifact: {', '.join(needing)} need one; run `kvcal calibrate` on the "
                                f"model, pass --artifact, or choose --method among {free}")
    if ratios:
        ratio_list = [float(r) for r in ratios]
    else:
        ratio_list = list(ctx.artifact.ratios) if ctx.artifact is not None else list(DEFAULT_RATIOS)
    if "uncompressed" not in names:
        chosen.insert(0, get_method("uncompressed"))
    own = {name: [float(r) for r in rs] for name, rs in (method_ratios or {}).items()}
    unknown = sorted(set(own) - {m.name for m in chosen})
    if unknown:
        raise DataError(f"ratios given for {', '.join(unknown)}, which are not among the methods run")
    specs = []
    for m in chosen:
        for r in (own.get(m.name, ratio_list) if m.takes_ratio else [None]):
            m.check(ctx, r)
            specs.append(RunSpec(m, r))
    return specs


def perplexity_windows(tokenizer, texts: list[str], settings: EvalSettings) -> torch.Tensor:
    """``[windows, prefix + continuation]`` non-overlapping token windows spread evenly over the data."""
    span = settings.prefix + settings.continuation
    stream = token_stream(tokenizer, texts)
    if settings.windows == 0:
        return torch.empty(0, span, dtype=torch.long)
    if stream.numel() < span * settings.windows:
        raise DataError(f"evaluation data has {stream.numel()} tokens, fewer than {settings.windows} windows of {span}; "
                        "give more text or fewer --windows")
    stride = (stream.numel() - span) // max(settings.windows - 1, 1)
    return torch.stack([stream[i * stride : i * stride + span] for i in range(settings.windows)])


def needle_trials(tokenizer, texts: list[str], settings: EvalSettings) -> list[NeedleTrial]:
    if settings.needles == 0:
        return []
    probe = NeedleProbe(context_len=settings.needle_context, trials=settings.needles, seed=settings.seed)
    return probe.build(tokenizer, texts)


@torch.no_grad()
def prefill_with_queries(model, ctx: MethodContext, ids: torch.Tensor, all_queries: bool = False) -> Prefilled:
    """Prefill ``ids`` ``[1, n]`` and keep every layer's last ``obs_window`` pre-RoPE queries for eviction scores.

    ``all_queries`` keeps every prefix query instead (for methods scored by the whole prefill's attention, H2O).
    """
    keep = ids.shape[1] if all_queries else ctx.obs_window
    with last_queries(ctx.adapter, range(ctx.layout.num_layers), keep) as queries:
        cache = prefill(model, ids)
    return Prefilled(cache, dict(queries), ids.shape[1])


@torch.no_grad()
def logits_after(model, ctx: MethodContext, cache, feed: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``[n, vocab]`` for ``feed`` fed after ``cache`` at positions ``start``…"""
    ragged = ragged_attention(model) if is_ragged(cache, ctx.coded_layers) else nullcontext()
    with ragged:
        return continue_from(model, cache, feed[None], start)[0]


@dataclass(frozen=True)
class Scored:
    nll: float
    hits: int


def score(model, ctx: MethodContext, cache, feed: torch.Tensor, targets: torch.Tensor, start: int) -> Scored:
    logits = logits_after(model, ctx, cache, feed, start)
    targets = targets.to(logits.device)
    nll = float(F.cross_entropy(logits, targets, reduction="sum"))
    return Scored(nll, int((logits.argmax(-1) == targets).sum()))


def evaluate(
    model,
    tokenizer,
    texts: list[str],
    methods: Sequence[str] | None = None,
    ratios: Sequence[float] | None = None,
    artifact: Artifact | None = None,
    settings: EvalSettings = EvalSettings(),
    progress: bool = True,
    model_name: str = "",
    method_ratios: Mapping[str, Sequence[float]] | None = None,
) -> EvalReport:
    """Run every method at every ratio on the same perplexity windows and needle trials.

    ``method_ratios`` overrides ``ratios`` per method name. Each row carries 95% paired-bootstrap intervals of
    its Δppl % and Δneedle accuracy against the full cache."""
    settings.validate()
    adapter = adapter_for(model)
    layout = adapter.layout()
    if artifact is not None:
        artifact.check_model(model, layout)
    ctx = MethodContext(model, adapter, layout, settings.sink, settings.window, artifact, settings.obs_window)
    specs = plan_runs(methods, ratios, ctx, method_ratios)
    control = RunSpec(StreamingLLM(), math.inf)  # keeps no middle token: the "middle evicted" control
    windows = perplexity_windows(tokenizer, texts, settings)
    trials = needle_trials(tokenizer, texts, settings)
    tallies = {spec: Tally() for spec in [*specs, control]}
    all_queries = any(spec.method.needs_all_queries for spec in specs)

    bar = tqdm(total=(len(windows) + len(trials)) * len(tallies), desc="eval", unit="run", disable=not progress)
    for ids in windows:
        context, continuation = ids[: settings.prefix], ids[settings.prefix :]
        feed = torch.cat([context[-1:], continuation[:-1]])
        _run_all(model, ctx, tallies, prefill_with_queries(model, ctx, context[None, :-1].to(model.device), all_queries),
                 feed, continuation, settings.prefix - 1, is_needle=False, bar=bar)
    for trial in trials:
        feed = torch.cat([trial.context[-1:], trial.target[:-1]])
        _run_all(model, ctx, tallies, prefill_with_queries(model, ctx, trial.context[None, :-1].to(model.device), all_queries),
                 feed, trial.target, trial.context.numel() - 1, is_needle=True, bar=bar)
    bar.close()

    base = tallies[specs[0]]
    rows = []
    for spec in specs:
        t = tallies[spec]
        delta = 100.0 * (t.ppl / base.ppl - 1.0) if t.ppl is not None else None
        rows.append(EvalRow(spec.method.name, spec.ratio, t.ratio, t.ppl, delta, t.accuracy, t.stored_bytes,
                            t.bf16_bytes, round(t.seconds, 3), spec.detail(ctx), tuple(round(x, 5) for x in t.window_nll), tuple(t.trial_hits)))
    art_name = str(artifact.path) if artifact is not None and artifact.path else None
    return EvalReport(model_name, art_name, settings, base.ppl, tallies[control].ppl, base.accuracy,
                      tallies[control].accuracy, rows).with_intervals()


def _run_all(model, ctx: MethodContext, tallies: dict[RunSpec, Tally], pre: Prefilled, feed: torch.Tensor,
             targets: torch.Tensor, start: int, is_needle: bool, bar) -> None:
    feed = feed.to(model.device)
    for spec, tally in tallies.items():
        t0 = time.perf_counter()
        out = spec.method.apply(pre, ctx, spec.ratio)
        scored = score(model, ctx, out.cache, feed, targets, start)
        tally.seconds += time.perf_counter() - t0
        tally.stored_bytes += out.stored_bytes
        tally.bf16_bytes += out.bf16_bytes
        if is_needle:
            tally.hits += scored.hits
            tally.needle_tokens += targets.numel()
            tally.trial_hits.append(scored.hits)
        else:
            tally.nll += scored.nll
            tally.tokens += targets.numel()
            tally.window_nll.append(scored.nll)
        bar.update(1)

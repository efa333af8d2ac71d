"""Summaries with intervals, and the paired comparison of two runs on the same tasks.

Intervals are percentile bootstraps over images (numpy, fixed seed: the same scores give the same
interval). Images of one identity are not independent, so on the full benchmark these intervals are a
lower bound on the uncertainty across identities; the per-identity breakdown shows that spread.
The paired tests are scipy's (`scipy.stats.wilcoxon`, `scipy.stats.binomtest` for the sign test).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
_CHUNK = 100  # resamples drawn at once: memory stays ~ 100 × n, also on 35 000 images


def _bootstrap_means(values: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    return np.concatenate([values[rng.integers(0, n, size=(_CHUNK, n))].mean(axis=1)
                           for _ in range(BOOTSTRAP_RESAMPLES // _CHUNK)])


def bootstrap_ci95(values: np.ndarray, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95 % interval of the mean; None below two values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    means = _bootstrap_means(values, seed)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarise(values) -> dict:
    """mean, std (ddof 1), n and the 95 % interval of the finite values (NaN = not scored).

    Equal values have std 0 exactly: computed, it is the rounding residue of their mean (1e-16), whose
    last bits depend on the CPU's SIMD summation and would make a report differ between machines."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    equal = len(values) > 1 and bool(np.all(values == values[0]))
    return {"mean": float(values.mean()) if len(values) else None,
            "std": (0.0 if equal else float(values.std(ddof=1))) if len(values) > 1 else None,
            "n": int(len(values)),
            "ci95": bootstrap_ci95(values)}


@dataclass
class PairedResult:
    """A − B over the images both runs scored: mean difference, its paired-bootstrap interval, tests."""

    metric: str
    higher_is_better: bool
    n: int
    mean_a: float | None
    mean_b: float | None
    difference: float | None  # mean of per-image (A − B)
    ci95: list[float] | None
    p_wilcoxon: float | None
    p_sign: float | None

    @property
    def significant(self) -> bool:
        """Both the interval excludes 0 and the Wilcoxon test rejects at 5 %."""
        return (self.ci95 is not None and self.p_wilcoxon is not None and self.p_wilcoxon < 0.05
                and (self.ci95[0] > 0 or self.ci95[1] < 0))

    def a_is_better(self) -> bool:
        return (self.difference or 0.0) > 0 if self.higher_is_better else (self.difference or 0.0) < 0

    def to_dict(self) -> dict:
        return asdict(self) | {"significant": self.significant}


def paired_comparison(a: np.ndarray, b: np.ndarray, metric: str, higher_is_better: bool, seed: int = 0) -> PairedResult:
    """Paired bootstrap of the mean per-image difference A − B (images resampled together), the
    Wilcoxon signed-rank test and the sign test on the same differences. Pairs where either value is
    missing (NaN) are left out. All differences zero: p = 1 (scipy's tests are undefined there)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    d = a - b
    n = len(d)
    if n == 0:
        return PairedResult(metric, higher_is_better, 0, None, None, None, None, None, None)
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        p_wilcoxon = p_sign = 1.0
    else:
        p_wilcoxon = float(stats.wilcoxon(nonzero).pvalue)
        p_sign = float(stats.binomtest(int((nonzero > 0).sum()), len(nonzero), 0.5).pvalue)
    return PairedResult(metric, higher_is_better, n, float(a.mean()), float(b.mean()), float(d.mean()),
                        bootstrap_ci95(d, seed), p_wilcoxon, p_sign)


def paired_sentence(result: PairedResult, name_a: str, name_b: str, decided: bool | None = None,
                    p_holm: float | None = None) -> str:
    """'A beats B on id_sim_facenet by 0.031 [0.018, 0.044], p < 0.001' or 'no significant difference'.
    Among many pairs, `decided` and `p_holm` (Holm-adjusted p) replace the single test's verdict."""
    from caphuman_bench.report.numbers import fmt, fmt_p

    if result.n == 0:
        return f"{name_a} vs {name_b} on {result.metric}: no image scored in both runs"
    significant = result.significant if decided is None else decided

    def interval(scale: float) -> str:
        if result.ci95 is None:
            return "[–]"
        low, high = sorted(scale * v for v in result.ci95)
        return f"[{fmt(low, 2)}, {fmt(high, 2)}]"

    tail = f"{fmt_p(result.p_wilcoxon)}" + (f", Holm-adjusted {fmt_p(p_holm)}" if p_holm is not None else "") + f", n = {result.n}"
    if not significant:
        return (f"{name_a} and {name_b} do not differ significantly on {result.metric}: "
                f"{name_a} − {name_b} = {fmt(result.difference, 2)} {interval(1.0)}, {tail}")
    # The improvement of the winner over the loser, positive in the metric's good direction.
    scale = (1.0 if result.a_is_better() else -1.0) * (1.0 if result.higher_is_better else -1.0)
    winner, loser = (name_a, name_b) if result.a_is_better() else (name_b, name_a)
    word = "higher" if result.higher_is_better else "lower"
    return (f"{winner} beats {loser} on {result.metric} ({word} is better) by "
            f"{fmt(scale * result.difference, 2)} {interval(scale)}, {tail}")


RECOGNISERS = ("id_sim_facenet", "id_sim_arcface", "id_sim_dlib", "id_sim_curricularface")


def recogniser_means(results: list[dict], labels: list[str]) -> dict[str, dict[str, float]]:
    """recogniser -> {run label: mean} over the runs (results.json payloads) that scored it."""
    means: dict[str, dict[str, float]] = {}
    for res, label in zip(results, labels):
        for name in RECOGNISERS:
            mean = (res["metrics"].get(name) or {}).get("mean")
            if mean is not None:
                means.setdefault(name, {})[label] = mean
    return means


def recogniser_agreement(means: dict[str, dict[str, float]]) -> list[dict]:
    """Kendall's τ (scipy, τ-b) between the rankings of methods by each two face recognisers.

    `means`: recogniser -> {method: mean}. Only methods both recognisers scored count; a pair with fewer
    than three such methods gets no τ (two points always agree or disagree completely). A method that
    games one recogniser (e.g. trained on ArcFace embeddings) shows as a low τ against the others.
    """
    from scipy.stats import kendalltau

    rows = []
    names = [r for r in RECOGNISERS if r in means]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            methods = sorted(set(means[a]) & set(means[b]))
            tau = p = None
            if len(methods) >= 3:
                result = kendalltau([means[a][m] for m in methods], [means[b][m] for m in methods])
                if np.isfinite(result.statistic):
                    tau, p = float(result.statistic), float(result.pvalue)
            rows.append({"recogniser_a": a, "recogniser_b": b, "methods": len(methods), "kendall_tau": tau, "p_value": p})
    return rows


def holm_adjust(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test
    procedure", Scand. J. Statist. 6:65–70), in the input's order; None stays None and is not counted.

    Sorted ascending p_(1) ≤ … ≤ p_(m): adjusted p_(i) = max over j ≤ i of min(1, (m − j + 1) · p_(j)),
    the convention of statsmodels' `multipletests(method="holm")` and R's `p.adjust(method="holm")`.
    Rejecting where the adjusted p < α controls the family-wise error rate at α over the m tests.
    """
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class Verdict:
    """One cell of the win/tie/loss matrix: row run against column run on one value."""

    outcome: str  # "win", "loss" or "tie" for the row's run
    result: PairedResult  # row − column
    p_holm: float | None


def win_tie_loss(pairs: dict[tuple[int, int], PairedResult], alpha: float = 0.05) -> dict[tuple[int, int], Verdict]:
    """Every ordered cell (i, j) of the matrix from the pairs (i < j, result = i − j) of one value.

    The Wilcoxon p-values of all pairs are Holm-adjusted together (one family per value); a pair is
    decided when its adjusted p < `alpha` and its paired-bootstrap interval excludes 0, else a tie.
    """
    keys = list(pairs)
    adjusted = holm_adjust([pairs[k].p_wilcoxon for k in keys])
    cells = {}
    for (i, j), p_holm in zip(keys, adjusted):
        r = pairs[(i, j)]
        decided = (p_holm is not None and p_holm < alpha and r.ci95 is not None and (r.ci95[0] > 0 or r.ci95[1] < 0))
        outcome = ("win" if r.a_is_better() else "loss") if decided else "tie"
        mirrored = {"win": "loss", "loss": "win", "tie": "tie"}[outcome]
        cells[(i, j)] = Verdict(outcome, r, p_holm)
        cells[(j, i)] = Verdict(mirrored, r, p_holm)
    return cells

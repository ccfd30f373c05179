"""The formulation study's ranking (docs/paper.md §3): non-dominated sorting per setting, ranks averaged over settings.

For each evaluation setting (sampler steps x CFG x EMA-or-raw weights) the variants are sorted into Pareto fronts on
(CLIP score, FID): front 1 holds the variants no other variant beats on both, front 2 those only front-1 variants
beat, and so on; a variant's rank in that setting is its front number. Table 1 averages these ranks over settings.
"""
from __future__ import annotations

import math

# docs/paper.md §3 Table 1: average rank over all settings / the 5-step settings / the 50-step settings.
PAPER_TABLE1 = {
    "rf/lognorm(0.00, 1.00)": (1.54, 1.25, 1.50),
    "rf/lognorm(1.00, 0.60)": (2.08, 3.50, 2.00),
    "rf/lognorm(0.50, 0.60)": (2.71, 8.50, 1.00),
    "rf/mode(1.29)": (2.75, 3.25, 3.00),
    "rf/lognorm(0.50, 1.00)": (2.83, 1.50, 2.50),
    "eps/linear": (2.88, 4.25, 2.75),
    "rf/mode(1.75)": (3.33, 2.75, 2.75),
    "rf/cosmap": (4.13, 3.75, 4.00),
    "edm(0.00, 0.60)": (5.63, 13.25, 3.25),
    "rf": (5.67, 6.50, 5.75),
    "v/linear": (6.83, 5.75, 7.75),
    "edm(0.60, 1.20)": (9.00, 13.00, 9.00),
    "v/cos": (9.17, 12.25, 8.75),
    "edm/cos": (11.04, 14.25, 11.25),
    "edm/rf": (13.04, 15.25, 13.25),
    "edm(-1.20, 1.20)": (15.58, 20.25, 15.00),
}
PAPER_COLUMNS = ("all", "5 steps", "50 steps")

CLIP_FID = ("max", "min")  # higher CLIP score is better, lower FID is better


def dominates(a, b, directions=CLIP_FID) -> bool:
    """a is at least as good as b in every objective and strictly better in one."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d not in ("max", "min"):
            raise ValueError(f"objective direction must be 'max' or 'min', got {d!r}")
        if d == "min":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_fronts(points: dict, directions=CLIP_FID) -> list[list]:
    """Non-dominated sorting: the names of `points` (name -> objective tuple) in fronts, best front first."""
    bad = [k for k, p in points.items() if len(p) != len(directions) or not all(math.isfinite(v) for v in p)]
    if bad:
        raise ValueError(f"non-dominated sorting needs {len(directions)} finite objectives per point; bad: {bad}")
    left, fronts = dict(points), []
    while left:
        front = [k for k, p in left.items() if not any(dominates(q, p, directions) for j, q in left.items() if j != k)]
        fronts.append(sorted(front, key=str))
        for k in front:
            del left[k]
    return fronts


def pareto_ranks(points: dict, directions=CLIP_FID) -> dict:
    """Each name's front number (1 = non-dominated)."""
    return {k: i + 1 for i, front in enumerate(pareto_fronts(points, directions)) for k in front}


def average_ranks(ranks: dict[str, dict], settings=None) -> dict:
    """Mean rank per variant over the given settings (default all); every variant must be ranked in each."""
    settings = list(ranks) if settings is None else list(settings)
    if not settings:
        raise ValueError("average_ranks: no settings to average over")
    names = set().union(*(ranks[s] for s in settings))
    missing = {s: sorted(names - set(ranks[s])) for s in settings if names - set(ranks[s])}
    if missing:
        raise ValueError(f"average_ranks: variants missing from settings: {missing}")
    return {n: sum(ranks[s][n] for s in settings) / len(settings) for n in sorted(names)}


def order(avg: dict) -> list:
    """Names by average rank, best first (ties by name)."""
    return sorted(avg, key=lambda n: (avg[n], n))


def spearman_vs_paper(avg: dict, column: str = "all") -> tuple[float, float, list]:
    """Spearman correlation of our average ranks with Table 1's over the variants in both: (rho, p-value, names).

    rho = 1 when the two orders agree; NaN when fewer than 3 variants are shared or one side is constant.
    """
    from scipy.stats import spearmanr
    idx = PAPER_COLUMNS.index(column)
    shared = [n for n in PAPER_TABLE1 if n in avg]
    if len(shared) < 3:
        return math.nan, math.nan, shared
    ours = [avg[n] for n in shared]
    theirs = [PAPER_TABLE1[n][idx] for n in shared]
    if len(set(ours)) < 2:
        return math.nan, math.nan, shared
    result = spearmanr(ours, theirs)
    return float(result.statistic), float(result.pvalue), shared

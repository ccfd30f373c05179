"""The formulation study (docs/paper.md §3, Table 1): which forward process, loss weighting and timestep sampler
is best?

Every variant trains the same model with the same data, steps and seed; only `formulation` differs. Each is sampled
with the paper's six Euler settings (50 steps at CFG 1.0, 2.5 and 5.0; 5, 10 and 25 steps at CFG 5.0) from its EMA
and its raw weights: 12 settings. Per setting the variants are ranked by non-dominated sorting on (CLIP score, FID)
and the ranks averaged over settings (all, the 5-step ones, the 50-step ones), as the paper does; on shapes a second
ranking adds the GenEval-style overall score as a third objective. The ranking is printed beside Table 1 with the
Spearman correlation between the two over the variants in both.
"""
from __future__ import annotations

from pathlib import Path

from rectflow.evaluate.protocol import Setting, metric_value
from rectflow.flow import TABLE1, paper_grid
from rectflow.studies import ranking
from rectflow.studies.common import (
    Run,
    StudyOptions,
    figure,
    fmt,
    parameter_count,
    samples_section,
    study_config,
    table,
    train_spec,
    trained,
)
from rectflow.studies.evaluation import evaluation, final_loss

TITLE = "Formulation study (paper §3, Table 1) at small scale"
STEPS = 1000  # training steps per variant at budget 1
SAMPLERS = [(50, 1.0), (50, 2.5), (50, 5.0), (5, 5.0), (10, 5.0), (25, 5.0)]  # (Euler steps, CFG), docs/paper.md §3
SETTINGS = [Setting(weights, steps, cfg) for weights in ("ema", "raw") for steps, cfg in SAMPLERS]
SCATTER = Setting("ema", 25, 5.0)  # the setting of the CLIP-FID figure (Table 2 uses 25 steps)


def variants(opts: StudyOptions) -> list[str]:
    """Table 1's 16 variants, or the paper's 61 with --grid paper."""
    return list(TABLE1) if opts.grid == "table1" else paper_grid()


def config(opts: StudyOptions, formulation: str):
    """The training config of one variant."""
    return study_config(opts, STEPS, formulation=formulation)


def runs(opts: StudyOptions) -> list[Run]:
    """One run per variant."""
    return [Run(name, {"formulation": name, "train": train_spec(config(opts, name)), "eval": opts.eval_spec(),
                       "settings": [s.key for s in SETTINGS]}) for name in variants(opts)]


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train one variant and score it at every setting."""
    cfg = config(opts, run.spec["formulation"])
    trainer = trained(run_dir, cfg)
    scores = evaluation(opts, cfg).evaluate(trainer, run_dir, SETTINGS)
    return {"formulation": run.spec["formulation"], "scores": scores, "params": parameter_count(trainer.model),
            "final_loss": final_loss(run_dir)}


# ---------------------------------------------------------------- the ranking


def setting_ranks(results: dict, objectives: tuple[str, ...]) -> dict[str, dict]:
    """setting key -> {variant: Pareto front number} on the given metrics (clip_score: max, fid: min, geneval: max)."""
    directions = tuple("min" if o == "fid" else "max" for o in objectives)
    out = {}
    for s in SETTINGS:
        points = {name: tuple(metric_value(r["scores"][s.key], o) for o in objectives) for name, r in results.items()}
        out[s.key] = ranking.pareto_ranks(points, directions)
    return out


def rank_table(results: dict, objectives: tuple[str, ...]) -> dict[str, dict]:
    """column -> {variant: average rank} for all settings, the 5-step and the 50-step ones."""
    ranks = setting_ranks(results, objectives)
    groups = {"all": SETTINGS, "5 steps": [s for s in SETTINGS if s.steps == 5],
              "50 steps": [s for s in SETTINGS if s.steps == 50]}
    return {col: ranking.average_ranks(ranks, [s.key for s in group]) for col, group in groups.items()}


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """Our ranking beside Table 1, Spearman correlations, metrics at one setting, figures."""
    if len(results) < 2:
        return "\nFewer than two variants finished: nothing to rank yet.\n"
    shapes = all("geneval" in r["scores"][SCATTER.key] for r in results.values())
    ours = rank_table(results, ("clip_score", "fid"))
    with_geneval = rank_table(results, ("clip_score", "fid", "geneval")) if shapes else None
    names = ranking.order(ours["all"])
    paper_order = {n: i + 1 for i, n in enumerate(ranking.PAPER_TABLE1)}
    header = ["rank", "variant", "avg rank (all)", "5 steps", "50 steps"]
    header += ["all, with GenEval"] if shapes else []
    header += ["paper rank", "paper all", "paper 5 steps", "paper 50 steps"]
    rows = []
    for i, n in enumerate(names):
        paper = ranking.PAPER_TABLE1.get(n)
        row = [i + 1, f"`{n}`", ours["all"][n], ours["5 steps"][n], ours["50 steps"][n]]
        row += [with_geneval["all"][n]] if shapes else []
        row += [paper_order.get(n), *(paper or (None, None, None))]
        rows.append([fmt(c, 2) if isinstance(c, float) else c for c in row])
    corr_rows = []
    for col in ranking.PAPER_COLUMNS:
        rho, p, shared = ranking.spearman_vs_paper(ours[col], col)
        corr_rows.append([col, len(shared), fmt(rho, 2), fmt(p, 3)])
    s = SCATTER.key
    metric_rows = [[f"`{n}`", fmt(results[n]["scores"][s]["clip_score"], 2),
                    fmt(results[n]["scores"][s]["fid"], 2), fmt(metric_value(results[n]["scores"][s], "geneval"), 3),
                    fmt(results[n]["final_loss"], 4)] for n in names]
    _scatter(results, fig_dir / "clip_fid.png")
    _rank_vs_paper(ours["all"], fig_dir / "rank_vs_paper.png")
    rel = fig_dir.name
    per_setting = setting_ranks(results, ("clip_score", "fid"))
    return "\n".join([
        "## Ranking", "",
        f"{len(results)} variants. Per setting (Euler: 50 steps at CFG 1, 2.5, 5; 5, 10, 25 steps at CFG 5; EMA and "
        "raw weights: 12 settings) the variants are sorted into Pareto fronts on (CLIP score higher, FID lower); a "
        "variant's rank is its front, averaged over the settings (paper §3). The paper averages over 24 settings "
        "(two data sets); its columns are Table 1's." + (" `all, with GenEval` adds the GenEval-style overall "
                                                           "score as a third objective." if shapes else ""), "",
        table(header, rows), "",
        "Spearman correlation of our average ranks with the paper's, over the variants in both:", "",
        table(["column", "variants", "rho", "p-value"], corr_rows), "",
        f"![CLIP score vs FID]({rel}/clip_fid.png) ![our rank vs the paper's]({rel}/rank_vs_paper.png)", "",
        f"## Metrics at {SCATTER.steps} Euler steps, CFG {SCATTER.cfg:g}, EMA weights", "",
        table(["variant", "CLIP score", "FID", "GenEval overall", "final train loss"], metric_rows), "",
        "Per-setting numbers: `eval/<setting>.json` in each run folder; raw per-setting ranks below.", "",
        "<details><summary>ranks per setting</summary>", "",
        table(["variant", *[k.key for k in SETTINGS]],
              [[f"`{n}`", *[per_setting[k.key][n] for k in SETTINGS]] for n in names]),
        "", "</details>", "",
        samples_section(opts, {f"`{n}`": (n, s) for n in names}, fig_dir,
                        f"Samples ({SCATTER.steps} Euler steps, CFG {SCATTER.cfg:g}, EMA weights)")])


def _scatter(results: dict, path: Path) -> None:
    """CLIP score against FID at the scatter setting, front 1 marked."""
    s = SCATTER.key
    pts = {n: (r["scores"][s]["clip_score"], r["scores"][s]["fid"]) for n, r in results.items()}
    front = set(ranking.pareto_fronts(pts)[0])

    def draw(ax):
        for n, (c, f) in pts.items():
            ax.scatter(f, c, color="C3" if n in front else "C0", s=18)
            ax.annotate(n, (f, c), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("FID (lower is better)")
        ax.set_ylabel("CLIP score (higher is better)")
        ax.set_title(f"{SCATTER.steps} steps, CFG {SCATTER.cfg:g}, EMA (red: Pareto front)", fontsize=9)
    figure(path, draw, size=(7, 5))


def _rank_vs_paper(avg: dict, path: Path) -> None:
    """Our average rank against Table 1's, for the shared variants."""
    shared = [n for n in ranking.PAPER_TABLE1 if n in avg]

    def draw(ax):
        for n in shared:
            ax.scatter(ranking.PAPER_TABLE1[n][0], avg[n], color="C0", s=18)
            ax.annotate(n, (ranking.PAPER_TABLE1[n][0], avg[n]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("paper: average rank (Table 1, all)")
        ax.set_ylabel("ours: average rank (all settings)")
    figure(path, draw)


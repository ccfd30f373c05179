"""Sampling steps against model size (docs/paper.md §6, Table 6): do larger rectified-flow models need fewer steps?

Models of three depths (hidden 32 d, d heads: the paper's size rule with head dim 32 instead of 64) train with the
same recipe and are sampled with 5, 10, 20 and 50 Euler steps. The relative drop of a score at k steps against 50,

    drop_k = (score_50 - score_k) / score_50,

is reported for the CLIP score (as Table 6) and, on shapes, the GenEval-style overall score. The paper: d15 4.30% /
0.86% / 0.21%, d30 3.59% / 0.70% / 0.24%, d38 2.71% / 0.14% / 0.08% at 5 / 10 / 20 steps.
"""
from __future__ import annotations

from pathlib import Path

from rectflow.evaluate.protocol import Setting, metric_value
from rectflow.studies.common import (
    Run,
    StudyOptions,
    figure,
    fmt,
    parameter_count,
    read_json,
    samples_section,
    study_config,
    table,
    train_spec,
    trained,
)
from rectflow.studies.evaluation import evaluation, final_loss

TITLE = "Sampling steps against model size (paper §6, Table 6) at small scale"
DEPTHS = (2, 4, 6)
HEAD_DIM = 32
STEPS = 4000  # training steps per model at budget 1
SAMPLE_STEPS = (5, 10, 20, 50)
CFG = 5.0
PAPER = {15: (4.30, 0.86, 0.21), 30: (3.59, 0.70, 0.24), 38: (2.71, 0.14, 0.08)}  # depth -> % drop at 5/10/20


def settings() -> list[Setting]:
    """EMA samples at each step count."""
    return [Setting("ema", k, CFG) for k in SAMPLE_STEPS]


def config(opts: StudyOptions, depth: int):
    """The recipe at one depth."""
    return study_config(opts, STEPS, depth=depth, hidden=HEAD_DIM * depth, heads=depth)


def runs(opts: StudyOptions) -> list[Run]:
    """One run per depth."""
    return [Run(f"d{d}", {"depth": d, "train": train_spec(config(opts, d)), "eval": opts.eval_spec(),
                          "settings": [s.key for s in settings()]}) for d in DEPTHS]


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train one depth, sample with every step count."""
    cfg = config(opts, run.spec["depth"])
    trainer = trained(run_dir, cfg)
    scores = evaluation(opts, cfg).evaluate(trainer, run_dir, settings())
    return {"depth": run.spec["depth"], "scores": scores, "params": parameter_count(trainer.model),
            "final_loss": final_loss(run_dir),
            "train_seconds": (read_json(run_dir / "train_time.json") or {}).get("seconds")}


def relative_drop(scores: dict, metric: str, steps: int) -> float | None:
    """(score at 50 steps - score at `steps`) / score at 50 steps; None where undefined."""
    full = metric_value(scores[Setting("ema", 50, CFG).key], metric)
    part = metric_value(scores[Setting("ema", steps, CFG).key], metric)
    if full is None or part is None or full == 0:
        return None
    return (full - part) / full


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """Table 6 at small scale (CLIP score and GenEval drops), beside the paper's."""
    if not results:
        return "\nNo run finished yet.\n"
    names = [f"d{d}" for d in DEPTHS if f"d{d}" in results]
    lines = ["## Results", "", f"Euler, CFG {CFG:g}, EMA weights. Relative drop against 50 steps (positive: worse "
             "with fewer steps).", ""]
    for metric, label in (("clip_score", "CLIP score"), ("geneval", "GenEval overall")):
        if any(metric_value(results[n]["scores"][settings()[-1].key], metric) is None for n in names):
            continue
        rows = []
        for n in names:
            r = results[n]
            rows.append([n, f"{r['params'] / 1e6:.2f}M", fmt(metric_value(r["scores"][settings()[-1].key], metric), 3),
                         *[_pct(relative_drop(r["scores"], metric, k)) for k in SAMPLE_STEPS[:-1]]])
        if metric == "clip_score":
            rows += [[f"paper d{d}", "", "", *[f"{v:.2f}%" for v in PAPER[d]]] for d in PAPER]
        lines += [f"**{label}**", "", table(["model", "params", f"{label} at 50", *[f"{k} steps" for k in
                                                                                   SAMPLE_STEPS[:-1]]], rows), ""]
    _plot(results, names, fig_dir / "drop.png")
    lines += [f"![relative CLIP-score drop]({fig_dir.name}/drop.png)", ""]
    shown = {f"{n}, {s.steps} steps": (n, s.key) for n in names for s in settings() if s.steps in (5, 50)}
    lines += [samples_section(opts, shown, fig_dir, f"Samples (Euler, CFG {CFG:g}, EMA)")]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    """A fraction as a percentage."""
    return "" if x is None else f"{100 * x:.2f}%"


def _plot(results: dict, names: list[str], path: Path) -> None:
    """Relative CLIP-score drop against sampling steps, one line per depth."""
    def draw(ax):
        for n in names:
            drops = [relative_drop(results[n]["scores"], "clip_score", k) for k in SAMPLE_STEPS[:-1]]
            ax.plot(SAMPLE_STEPS[:-1], [100 * d if d is not None else float("nan") for d in drops], marker="o",
                    label=n)
        ax.set_xlabel("Euler steps")
        ax.set_ylabel("relative CLIP-score drop vs 50 steps (%)")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    figure(path, draw)

"""The resolution-dependent timestep shift (docs/paper.md §5): at a higher resolution, train and sample with shift
alpha.

    t_m = alpha t_n / (1 + (alpha - 1) t_n)

The same recipe trains at 1.5 times the base side (48 px against the studies' 32 px: 2.25 times the pixels) with
training shifts alpha in {1, 1.5, 3}, and each model is sampled with each of those shifts: a 3 x 3 grid of
(training, sampling) shift. The paper's rule alpha = sqrt(m / n) gives 1.5 for 48^2 against 32^2; SD3 uses 3 at
1024^2, and human raters preferred shifts above 1.5. The patch grows with the side (6 px at 48 px) so every run has
the base's 64 tokens and the same cost: what changes is how much the noise hides, per token, at a given t. (64 px
would need 8 px patches, 192 values per token: more than the recipe's hidden width of 128, a rank bottleneck that
leaves a third of the noise in every sample.)
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

TITLE = "Resolution-dependent timestep shift (paper §5) at small scale"
ALPHAS = (1.0, 1.5, 3.0)
RESOLUTION, BASE_RESOLUTION, PATCH = 48, 32, 6
STEPS = 4000  # training steps per shift at budget 1
SAMPLER = (25, 5.0)  # Euler steps, CFG
METRICS = (("clip_score", "CLIP score", 2, "clip"), ("fid", "FID", 2, "fid"),  # (key, label, digits, figure name)
           ("geneval", "GenEval overall", 3, "geneval"))


def settings() -> list[Setting]:
    """EMA samples at each sampling shift."""
    return [Setting("ema", SAMPLER[0], SAMPLER[1], shift=a) for a in ALPHAS]


def name(alpha: float) -> str:
    """Run name of a training shift."""
    return f"shift-{alpha:g}"


def config(opts: StudyOptions, alpha: float):
    """The recipe at the high resolution with training shift alpha."""
    return study_config(opts, STEPS, recipe={"resolution": RESOLUTION, "patch_size": PATCH}, shift=alpha)


def runs(opts: StudyOptions) -> list[Run]:
    """One run per training shift."""
    return [Run(name(a), {"shift": a, "train": train_spec(config(opts, a)), "eval": opts.eval_spec(),
                          "settings": [s.key for s in settings()]}) for a in ALPHAS]


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train with one shift, sample with every shift."""
    cfg = config(opts, run.spec["shift"])
    trainer = trained(run_dir, cfg)
    scores = evaluation(opts, cfg).evaluate(trainer, run_dir, settings())
    return {"shift": run.spec["shift"], "resolution": cfg.resolution, "scores": scores,
            "params": parameter_count(trainer.model), "final_loss": final_loss(run_dir),
            "train_seconds": (read_json(run_dir / "train_time.json") or {}).get("seconds")}


def grid(results: dict, metric: str) -> list[list[float | None]]:
    """metric[training shift][sampling shift] (None where a run is missing)."""
    out = []
    for a in ALPHAS:
        r = results.get(name(a))
        out.append([metric_value(r["scores"][s.key], metric) if r else None for s in settings()])
    return out


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """One table per metric: training shift (rows) x sampling shift (columns); heat maps."""
    if not results:
        return "\nNo run finished yet.\n"
    cfg = config(opts, ALPHAS[0])  # the recipe with the user's --set changes, which may move resolution and patch
    res = cfg.resolution
    lines = ["## Results", "",
             f"Trained and sampled at {res} px ({cfg.patch_size} px patches); rule of thumb alpha = sqrt({res}^2 / "
             f"{BASE_RESOLUTION}^2) = {res / BASE_RESOLUTION:g}. Samples: {SAMPLER[0]} Euler steps, CFG "
             f"{SAMPLER[1]:g}, EMA weights. Rows: training shift; columns: sampling shift.", ""]
    for metric, label, digits, figure_name in METRICS:
        g = grid(results, metric)
        if all(v is None for row in g for v in row):
            continue
        rows = [[f"train {a:g}", *[fmt(v, digits) for v in row]] for a, row in zip(ALPHAS, g)]
        lines += [f"**{label}**", "", table(["", *[f"sample {a:g}" for a in ALPHAS]], rows), ""]
        _heat(g, label, fig_dir / f"{figure_name}.png")
        lines += [f"![{label}]({fig_dir.name}/{figure_name}.png)", ""]
    losses = [[name(a), fmt(results[name(a)]["final_loss"], 4)] for a in ALPHAS if name(a) in results]
    lines += ["Final training loss (not comparable across shifts: each weights t differently):", "",
              table(["run", "loss"], losses), ""]
    shown = {f"trained and sampled with shift {a:g}": (name(a), s.key) for a, s in zip(ALPHAS, settings())}
    lines += [samples_section(opts, shown, fig_dir, f"Samples ({SAMPLER[0]} Euler steps, CFG {SAMPLER[1]:g}, EMA)")]
    return "\n".join(lines)


def _heat(g: list[list], label: str, path: Path) -> None:
    """A heat map of one metric over (training shift, sampling shift)."""
    import numpy as np
    values = np.array([[np.nan if v is None else v for v in row] for row in g], dtype=float)

    def draw(ax):
        im = ax.imshow(values, cmap="viridis")
        ax.set_xticks(range(len(ALPHAS)), [f"{a:g}" for a in ALPHAS])
        ax.set_yticks(range(len(ALPHAS)), [f"{a:g}" for a in ALPHAS])
        ax.set_xlabel("sampling shift")
        ax.set_ylabel("training shift")
        for i in range(len(ALPHAS)):
            for j in range(len(ALPHAS)):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
        ax.figure.colorbar(im, ax=ax)
        ax.set_title(label)
    figure(path, draw, size=(4.5, 3.8))

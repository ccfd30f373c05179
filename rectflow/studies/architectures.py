"""The architecture study (docs/paper.md §4): MM-DiT against CrossDiT, UViT, vanilla DiT and MM-DiT with 3 weight sets.

Every architecture trains with the same recipe, formulation, data, steps and seed, at the MM-DiT's parameter count
(rectflow.models.baselines.matched: same heads and depth where a width matches within 5%). The validation loss
(rectflow.evaluate.val_loss) of the EMA and raw weights is measured at evenly spaced checkpoints during training, and
the finished models are sampled and scored. The paper (CC12M): MM-DiT > CrossDiT > UViT > DiT, UViT learns fastest
early, and three weight sets gain little over two.
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
    scaled,
    study_config,
    table,
    train_spec,
    trained,
)
from rectflow.studies.evaluation import ValLossCurve, evaluation, final_loss

TITLE = "Architecture study (paper §4) at small scale"
STEPS = 3000        # training steps per architecture at budget 1
CURVE_POINTS = 8    # validation-loss measurements per run
VAL_ITEMS = 256     # validation images of the loss at budget 1
ARCHS = {"mmdit": "MM-DiT", "mmdit3": "MM-DiT, 3 weight sets", "crossdit": "CrossDiT", "uvit": "UViT",
         "dit": "DiT (concatenated tokens)"}
PAPER_ORDER = ["mmdit", "crossdit", "uvit", "dit"]  # best first (docs/paper.md §4); mmdit3 ~ mmdit
SETTINGS = [Setting("ema", 25, 5.0)]


def context_splits(text_encoder: str) -> list[int] | None:
    """MM-DiT-3's two context parts, for the run's spec: SD3 text encoders give [CLIP tokens, T5 tokens];
    single-encoder contexts (MiniLM) None, which MMDiT3 splits into halves. The trainer derives the same split
    from the loaded encoder (rectflow.train.context_splits)."""
    if not text_encoder.startswith("sd3"):
        return None
    lengths = {"clip_length": 77, "t5_length": 77}
    for item in text_encoder.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key in lengths:
            lengths[key] = int(value)
    return [lengths["clip_length"], lengths["t5_length"]]


def config(opts: StudyOptions, arch: str = "mmdit"):
    """The training config of one architecture (all but `arch` shared by every run)."""
    return study_config(opts, STEPS, checkpoints=CURVE_POINTS, arch=arch)


def runs(opts: StudyOptions) -> list[Run]:
    """One run per architecture."""
    spec = {"train": train_spec(config(opts)), "val_items": scaled(VAL_ITEMS, opts.budget, 16),
            "eval": opts.eval_spec(), "settings": [s.key for s in SETTINGS]}
    return [Run(arch, {"arch": arch, **spec,
                       **({"context_splits": context_splits(opts.text_encoder)} if arch == "mmdit3" else {})})
            for arch in ARCHS]


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train one architecture with a validation-loss curve, then score its samples."""
    cfg = config(opts, run.name)
    curve = ValLossCurve(run_dir, run.spec["val_items"], seed=opts.seed)
    trainer = trained(run_dir, cfg, on_checkpoint=curve)
    scores = evaluation(opts, cfg).evaluate(trainer, run_dir, SETTINGS)
    model_config = dict(trainer.model.config)
    return {"arch": run.name, "model": {k: model_config.get(k) for k in ("depth", "hidden_size", "num_heads")},
            "params": parameter_count(trainer.model), "curve": curve.records(), "scores": scores,
            "final_loss": final_loss(run_dir), "train_seconds": (read_json(run_dir / "train_time.json") or {})
            .get("seconds")}


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """Final validation loss and sample scores per architecture, loss curves, and the paper's ordering."""
    if not results:
        return "\nNo run finished yet.\n"
    s = SETTINGS[0].key
    names = sorted(results, key=lambda a: results[a]["curve"][-1]["ema"] if results[a]["curve"] else float("inf"))
    rows = []
    for a in names:
        r, last = results[a], (results[a]["curve"] or [{}])[-1]
        sc = r["scores"][s]
        rows.append([ARCHS[a], f"{r['params'] / 1e6:.2f}M", r["model"]["depth"], r["model"]["hidden_size"],
                     fmt(last.get("ema"), 4), fmt(last.get("raw"), 4), fmt(sc["clip_score"], 2), fmt(sc["fid"], 2),
                     fmt(metric_value(sc, "geneval"), 3), fmt((r.get("train_seconds") or 0) / 60, 1)])
    ours = [a for a in names if a in PAPER_ORDER]
    paper = [a for a in PAPER_ORDER if a in results]
    agree = "agrees with" if ours == paper else "differs from"
    _curves(results, fig_dir / "val_loss.png")
    rel = fig_dir.name
    early = _early_leader(results)
    lines = [
        "## Results", "",
        "All runs: same recipe, formulation, data, steps and seed; parameter counts matched to the MM-DiT within 5% "
        "(rectflow.models.baselines.matched). Validation loss: paper §3's protocol (8 levels of t, fixed noise), on "
        f"{CURVE_POINTS} evenly spaced checkpoints per run. Samples: {SETTINGS[0].steps} Euler steps, "
        f"CFG {SETTINGS[0].cfg:g}, EMA weights.", "",
        table(["architecture", "params", "depth", "hidden", "val loss (EMA)", "val loss (raw)", "CLIP score", "FID",
               "GenEval overall", "train minutes"], rows), "",
        f"Order by final validation loss: {' > '.join(ARCHS[a] for a in ours)}; this {agree} the paper's "
        f"{' > '.join(ARCHS[a] for a in paper)}." + (f" Lowest validation loss at the first checkpoint: "
                                                     f"{ARCHS[early]} (the paper: UViT learns fastest early)."
                                                     if early else ""), "",
        f"![validation loss during training]({rel}/val_loss.png)", ""]
    lines += [samples_section(opts, {ARCHS[a]: (a, s) for a in names}, fig_dir,
                              f"Samples ({SETTINGS[0].steps} Euler steps, CFG {SETTINGS[0].cfg:g}, EMA weights)")]
    if "mmdit" in results and "mmdit3" in results and results["mmdit"]["curve"] and results["mmdit3"]["curve"]:
        two, three = results["mmdit"]["curve"][-1]["ema"], results["mmdit3"]["curve"][-1]["ema"]
        lines += [f"Three weight sets vs two: final EMA validation loss {three:.4f} vs {two:.4f} "
                  f"({(three - two) / two:+.1%}); the paper finds little gain. With a single-encoder context "
                  f"(MiniLM) the third weight set takes the second half of the caption's tokens.", ""]
    return "\n".join(lines)


def _early_leader(results: dict) -> str | None:
    """The architecture with the lowest EMA validation loss at the first checkpoint."""
    firsts = {a: r["curve"][0]["ema"] for a, r in results.items() if r["curve"]}
    return min(firsts, key=firsts.get) if firsts else None


def _curves(results: dict, path: Path) -> None:
    """EMA validation loss against training step, one line per architecture."""
    def draw(ax):
        for i, (a, r) in enumerate(results.items()):
            steps = [c["step"] for c in r["curve"]]
            ax.plot(steps, [c["ema"] for c in r["curve"]], marker="o", ms=3, color=f"C{i}", label=ARCHS[a])
            ax.plot(steps, [c["raw"] for c in r["curve"]], ls=":", color=f"C{i}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (solid: EMA, dotted: raw)")
        ax.legend(fontsize=8)
    figure(path, draw)

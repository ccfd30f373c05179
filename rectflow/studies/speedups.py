"""Learning speed (docs/training.md "Learning speed"): the naive recipe (rectflow/recipes/naive.yaml) from scratch,
with each training option alone and in the combination the demo recipe (rectflow/recipes/demo.yaml) uses, at equal
CPU time and over several seeds, scored by `rectflow eval`'s protocol (GenEval-style per category, FID and CLIP score
of the offline scorer; Euler 50 steps, CFG 5, EMA weights).

Equal CPU time: each variant's step count is the budget (12 CPU minutes at budget 1, the demo's) divided by its own
step time, measured once by a probe in this process (process CPU time of a few steps) and kept in the study folder,
so every worker and every resume trains the same steps. The score is also taken at each of the run's checkpoints
(the curves of score against CPU minutes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rectflow.config import recipe
from rectflow.evaluate.protocol import Setting, metric_value
from rectflow.files import file_lock, read_json, read_jsonl, write_json
from rectflow.studies.common import (Run, StudyOptions, figure, fmt, parameter_count, samples_section, study_config,
                                     table, train_spec, trained)
from rectflow.studies.evaluation import evaluation
from rectflow.training import Trainer, distributed

TITLE = "Learning speed: training options from scratch at equal CPU time"
MINUTES = 12.0  # CPU minutes of training per run at budget 1 (the demo's budget)
SEEDS = 3
SAMPLES = 120  # GenEval-style images per evaluation (20 per category), as `rectflow eval` scores the demo
SETTING = Setting("ema", 50, 5.0)
CHECKPOINTS = 4
# the naive recipe (rectflow/recipes/naive.yaml) with...
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "text-16": {"text_encoder": "minilm:length=16"},       # shapes captions fit in 16 tokens (of MiniLM's 32)
    "contrastive": {"contrastive": 0.05},                 # contrastive flow matching, the authors' lambda
    "muon": {"optimizer": "muon"},
    "power-ema": {"ema_power": 6.94},                     # EDM2's sigma_rel 0.10
    "routing": {"route_fraction": 0.5, "route_start": 1, "route_end": -1},  # TREAD: half the tokens skip 1-4
    "registers": {"registers": 4},
    "x-pred": {"formulation": "x/lognorm(0.00, 1.00)"},  # JiT: the network outputs x0, rf's velocity loss
    "dispersive": {"dispersive": 0.5},                   # Wang & He: the middle block's tokens pushed apart
    "latent": {"autoencoder": "shapes-ae", "patch_size": 1},  # the shipped 8x8x4 SmallAE: 64 tokens, as the pixels
    "latent-f8": {"autoencoder": "shapes-ae-f8", "patch_size": 1},  # the 4x4x16 SmallAE: 16 tokens
    "narrow-b32": {"hidden": 128, "heads": 2, "batch_size": 32},  # ~2.5x the steps of a narrower model, half batch
    "text-12": {"text_encoder": "minilm:length=12"},  # the longest shapes caption is 12 MiniLM tokens
    "text-positions": {"text_positions": 32},  # learned positions of MiniLM's 32 text tokens
    "relation-heavy": {"data_options": {"category_weights": {"position": 3, "counting": 2}}},  # 1/3 position scenes
    # position scenes alone for the first half: the side of "A left of B" is learned first or not at all
    "curriculum": {"data_options": {"curriculum": [{"fraction": 0.5, "categories": ["position"]},
                                                   {"category_weights": {"position": 2, "counting": 2}}]}},
}
# the demo recipe (rectflow/recipes/demo.yaml) is the naive one with these (a test keeps the two equal)
COMBINED = ("text-12", "muon", "power-ema", "routing", "latent", "narrow-b32", "curriculum")
VARIANTS["combined"] = {k: v for name in COMBINED for k, v in VARIANTS[name].items()}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


RUN_LENGTH = ("max_steps", "checkpoint_every", "sample_every")


def naive_recipe() -> dict:
    """The naive recipe (rectflow/recipes/naive.yaml) without its run-length fields."""
    return {k: v for k, v in recipe("naive").items() if k not in RUN_LENGTH}


def eval_opts(opts: StudyOptions) -> StudyOptions:
    """The options with the study's evaluation size unless --samples says otherwise (for the evaluation only: the
    study folder, which holds the probe, stays the one of the given options)."""
    return opts if opts.samples is not None else dataclasses.replace(opts, samples=SAMPLES)


def probe_seconds(opts: StudyOptions, variant: str) -> float:
    """CPU seconds per optimizer step of a variant (measured once, kept in the study folder's probe.json)."""
    path = opts.study_dir / "probe.json"
    with file_lock(opts.study_dir / ".probe.lock"):
        probes = read_json(path) or {}
        if variant not in probes:
            cfg = config(opts, variant, steps=1000)
            trainer = Trainer(dataclasses.replace(cfg, sample_every=0, val_every=0), opts.study_dir / "probe-run")
            trainer.train_step()  # one-off costs
            c0 = time.process_time()
            for _ in range(5):
                trainer.step = 0  # repeat step 0: its captions' features are cached, the model step alone is timed
                trainer.train_step()
            probes[variant] = (time.process_time() - c0) / 5
            write_json(path, probes)
    return probes[variant]


def config(opts: StudyOptions, variant: str, steps: int | None = None, seed: int = 0):
    """The naive recipe with a variant's options, trained for `steps` (default: its share of the CPU budget)."""
    if steps is None:
        steps = max(1, int(MINUTES * 60 * opts.budget / probe_seconds(opts, variant)))
    return study_config(opts, steps, checkpoints=CHECKPOINTS, recipe={**naive_recipe(), "seed": opts.seed + seed,
                                                                      "warmup_steps": 100}, **VARIANTS[variant])


def names() -> list[tuple[str, int]]:
    """(variant, seed) of every run, seed-major."""
    return [(v, s) for s in range(SEEDS) for v in VARIANTS]


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def runs(opts: StudyOptions) -> list[Run]:
    """Every variant x seed (seed-major: a first seed of every variant before the second)."""
    out = []
    for variant, seed in names():
        if opts.variants and variant not in opts.variants and run_name(variant, seed) not in opts.variants:
            continue  # (not probed: --variants picks runs of these variants only)
        cfg = config(opts, variant, seed=seed)
        out.append(Run(run_name(variant, seed), {"variant": variant, "seed": seed, "train": train_spec(cfg),
                                                 "eval": eval_opts(opts).eval_spec(), "setting": SETTING.key}))
    return out


class CurvePoint:
    """A trainer hook: the protocol's scores at each checkpoint, appended to run_dir/curve.jsonl."""

    def __init__(self, run_dir: Path, opts: StudyOptions, cfg, seconds_per_step: float):
        self.path, self.opts, self.cfg, self.per_step = Path(run_dir) / "curve.jsonl", opts, cfg, seconds_per_step

    def __call__(self, trainer) -> None:
        if any(r["step"] == trainer.step for r in read_jsonl(self.path)):
            return
        scores = evaluation(self.opts, self.cfg).evaluate(trainer, self.path.parent / f"eval-{trainer.step}",
                                                           [SETTING])[SETTING.key]
        rec = {"step": trainer.step, "cpu_minutes": trainer.step * self.per_step / 60, **scores}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def execute(run: Run, run_dir: Path, opts: StudyOptions) -> dict:
    """Train one variant and seed within its CPU budget, scoring every checkpoint."""
    variant, seed = run.spec["variant"], run.spec["seed"]
    cfg = config(opts, variant, seed=seed)
    per_step = probe_seconds(opts, variant)
    curve = CurvePoint(run_dir, eval_opts(opts), cfg, per_step)
    trainer = trained(run_dir, cfg, on_checkpoint=curve)
    scores = evaluation(eval_opts(opts), cfg).evaluate(trainer, run_dir, [SETTING])
    distributed.shutdown(trainer.ctx)
    return {"variant": variant, "seed": seed, "steps": cfg.max_steps, "seconds_per_step": per_step,
            "img_per_s": cfg.batch_size / per_step, "params": parameter_count(trainer.model), "scores": scores,
            "curve": read_jsonl(run_dir / "curve.jsonl"),
            "train_seconds": (read_json(run_dir / "train_time.json") or {}).get("seconds")}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half the range) of the values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return sum(values) / len(values), (max(values) - min(values)) / 2


def summary(results: dict) -> dict[str, dict]:
    """Per variant: seeds, and mean and spread of every category, overall, FID and CLIP score."""
    out = {}
    for variant in VARIANTS:
        rs = [r for r in results.values() if r["variant"] == variant]
        if not rs:
            continue
        scores = [r["scores"][SETTING.key] for r in rs]
        row = {"seeds": len(rs), "img_per_s": rs[0]["img_per_s"], "steps": rs[0]["steps"]}
        for cat in CATEGORIES + ("overall",):
            row[cat] = _stats([s["geneval"].get(cat) for s in scores])
        row["fid"] = _stats([metric_value(s, "fid") for s in scores])
        row["clip_score"] = _stats([metric_value(s, "clip_score") for s in scores])
        out[variant] = row
    return out


def report(results: dict, opts: StudyOptions, fig_dir: Path) -> str:
    """The table of every variant (mean +- half range over seeds) and the curves of overall score vs CPU minutes."""
    if not results:
        return "\nNo run finished yet.\n"
    rows = []
    for variant, row in summary(results).items():
        def pm(key, digits=3):
            mean, spread = row[key]
            return "" if mean is None else f"{mean:.{digits}f} ± {spread:.{digits}f}"
        rows.append([variant, row["seeds"], *[pm(c, 2) for c in CATEGORIES], pm("overall"), pm("fid", 1),
                     pm("clip_score", 3), fmt(row["img_per_s"], 0), row["steps"]])
    lines = ["## Results", "",
             f"{MINUTES * opts.budget:g} CPU minutes of training per run (one thread), the naive recipe "
             f"(rectflow/recipes/naive.yaml) with each option (combined: the demo recipe); {SETTING.label}, "
             f"{eval_opts(opts).n_samples} GenEval-style prompts. Mean ± half the range over the seeds.", "",
             table(["variant", "seeds", *CATEGORIES, "overall", "FID", "CLIP score", "img/s", "steps"], rows), "",
             f"![overall GenEval score against CPU minutes]({fig_dir.name}/curves.png)", ""]
    _curves(results, fig_dir / "curves.png")
    shown = {f"{v} (seed 0)": (run_name(v, 0), SETTING.key) for v in VARIANTS if run_name(v, 0) in results}
    lines.append(samples_section(opts, shown, fig_dir, f"Samples ({SETTING.label})"))
    return "\n".join(lines)


def _curves(results: dict, path: Path) -> None:
    """Overall GenEval score against CPU minutes, one line per variant (mean over seeds at each checkpoint)."""
    def draw(ax):
        for variant in VARIANTS:
            curves = [r["curve"] for r in results.values() if r["variant"] == variant and r.get("curve")]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [sum(c[i]["cpu_minutes"] for c in curves) / len(curves) for i in range(n)]
            ys = [sum(c[i]["geneval"]["overall"] for c in curves) / len(curves) for i in range(n)]
            ax.plot(xs, ys, marker="o", label=variant)
        ax.set_xlabel("CPU minutes of training")
        ax.set_ylabel("GenEval-style overall")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure(path, draw)


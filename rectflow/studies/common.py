"""What the studies share: runs and options, the small recipe and its budget, training through the trainer,
evaluation through rectflow.evaluate, and report helpers (markdown tables, figures).

Every run of a study trains with the same recipe, data and seed except for the one thing the study varies. The
recipe (rectflow/recipes/study.yaml) is sized so each study's default grid finishes in about two hours on 2 CPU
cores at budget 1; `--budget b` multiplies the training steps and the number of evaluation samples.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rectflow.config import TrainConfig, apply_dict, apply_overrides, parse_override, recipe
from rectflow.devices import resolve_device
from rectflow.files import read_json, write_json
from rectflow.training import Trainer, distributed

# The studies' training recipe at budget 1 (rectflow/recipes/study.yaml): the trainer's defaults with a smaller
# model and batch.
RECIPE = recipe("study")
EVAL_SAMPLES = 96       # generated images per evaluation setting at budget 1 (16 per shapes GenEval category)
EVAL_REFERENCE = 1000   # real validation images of FID's reference set at budget 1
NOT_IN_SPEC = ("device", "cache_dir")  # training fields that do not change what a run computes


@dataclass(frozen=True)
class Run:
    """One point of a study's grid: its folder name, everything that defines it, and runs it depends on."""

    name: str
    spec: dict
    needs: tuple[str, ...] = ()


@dataclass
class StudyOptions:
    """The options of `rectflow ablate` that the studies read."""

    study: str
    budget: float = 1.0
    data: str = "shapes"
    text_encoder: str = "minilm"
    encoder: str = "scorer"
    variants: list[str] | None = None
    grid: str = "table1"
    samples: int | None = None
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    runs_dir: Path = Path("runs/ablate")
    out: Path = Path("docs/results")

    # the options that change what a run computes (--variants and --grid only pick runs of the same kind)
    RESULT_OPTIONS = ("data", "text_encoder", "encoder", "samples", "seed", "overrides")

    @property
    def study_dir(self) -> Path:
        """Where this study's runs live: budget-B, with a hash of the other result-changing options when they are not
        the defaults (so `--set resolution=32` gets runs of its own instead of clashing with the default ones)."""
        changed = {k: getattr(self, k) for k in self.RESULT_OPTIONS
                   if getattr(self, k) != getattr(StudyOptions(self.study), k)}
        suffix = "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""
        return Path(self.runs_dir) / self.study / f"budget-{self.budget:g}{suffix}"

    @property
    def n_samples(self) -> int:
        """Generated images per evaluation setting: --samples, else scaled by the budget."""
        return self.samples if self.samples is not None else scaled(EVAL_SAMPLES, self.budget, minimum=12)

    @property
    def n_reference(self) -> int:
        """Real images of the FID reference set."""
        return max(self.n_samples, scaled(EVAL_REFERENCE, self.budget))

    def eval_spec(self) -> dict:
        """What every run's evaluation depends on (part of each run's spec)."""
        return {"samples": self.n_samples, "reference": self.n_reference, "encoder": self.encoder, "seed": self.seed}

    def torch_device(self) -> torch.device:
        """The device of evaluation and of runs whose config says "auto"."""
        return resolve_device(self.device)


def scaled(n: int, budget: float, minimum: int = 1) -> int:
    """n scaled by the budget, at least `minimum`."""
    return max(minimum, round(n * budget))


# ---------------------------------------------------------------- files


def folder_name(name: str) -> str:
    """A run name as a folder name: 'rf/lognorm(0.00, 1.00)' -> 'rf_lognorm(0.00,1.00)'."""
    return re.sub(r"[^A-Za-z0-9._,()=+-]", "_", name.replace(" ", ""))


def cached(path: Path, compute):
    """The JSON in `path` (rectflow.files.write_json's layout), computing and writing it first when absent (how
    evaluations resume)."""
    value = read_json(path)
    if value is None:
        value = compute()
        write_json(path, value)
    return value


# ---------------------------------------------------------------- training


def study_config(opts: StudyOptions, steps: int, checkpoints: int = 4, recipe: dict | None = None, **varied):
    """A run's TrainConfig: RECIPE with the study's `recipe` changes, `steps` x budget, `checkpoints` evenly spaced
    checkpoints, the fields the study varies, then the user's --set overrides (which may not change a varied field:
    that would break the comparison).
    """
    max_steps = scaled(steps, opts.budget)
    base = {**RECIPE, "data": opts.data, "text_encoder": opts.text_encoder, "seed": opts.seed, "device": opts.device,
            "max_steps": max_steps, "warmup_steps": min(RECIPE["warmup_steps"], max(1, max_steps // 10)),
            "checkpoint_every": max(1, max_steps // checkpoints), "cache_dir": str(opts.study_dir / "cache")}
    cfg = apply_dict(TrainConfig(), {**base, **(recipe or {}), **varied}, source=f"study {opts.study}")
    clash = sorted({parse_override(o)[0].split(".")[0] for o in opts.overrides} & set(varied))
    if clash:
        raise ValueError(f"--set {', '.join(clash)}: the {opts.study} study varies {', '.join(clash)} itself; "
                         f"choose its values with --variants instead")
    return apply_overrides(cfg, opts.overrides).validate()


def train_spec(cfg) -> dict:
    """The part of a config that defines what a run computes (stored in spec.json, compared on resume).

    `arch` is left out when it is the default MM-DiT: the spec.json files written before the field existed have none.
    """
    return {k: v for k, v in cfg.to_dict().items()
            if k not in NOT_IN_SPEC and not (k == "arch" and v == "mmdit")}


def trained(run_dir: Path, cfg, on_checkpoint=None):
    """The run's Trainer holding its final weights: trains from scratch or from the latest checkpoint when needed.

    on_checkpoint(trainer) is called after every checkpoint the trainer writes (val-loss curves).
    """
    class StudyTrainer(Trainer):
        """The trainer with a hook after each checkpoint."""

        def save(self):
            path = super().save()
            if path is not None and on_checkpoint is not None:
                on_checkpoint(self)
            return path

    trainer = StudyTrainer(cfg, run_dir, resume=True)
    if on_checkpoint is not None and trainer.step > 0:
        on_checkpoint(trainer)  # a kill between a checkpoint and its hook would otherwise leave a gap
    if trainer.step < cfg.max_steps:
        t0 = time.perf_counter()
        try:
            trainer.fit()
        finally:
            distributed.shutdown(trainer.ctx)
        stats = read_json(Path(run_dir) / "train_time.json") or {}
        write_json(Path(run_dir) / "train_time.json",
                   {"seconds": stats.get("seconds", 0.0) + time.perf_counter() - t0, "steps": trainer.step})
    return trainer


def parameter_count(model) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- reports


def fmt(x, digits: int = 3) -> str:
    """A number for a table (blank for None, NaN as 'nan')."""
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def samples_section(opts: StudyOptions, shown: dict[str, tuple[str, str]], fig_dir: Path, title: str) -> str:
    """Markdown showing sample grids (label -> (run name, setting key)), copied into the report's figures folder."""
    lines = [f"## {title}", ""]
    for label, (name, key) in shown.items():
        src = opts.study_dir / folder_name(name) / "eval" / f"{key}.png"
        if not src.is_file():
            continue
        dst = fig_dir / "samples" / re.sub(r"[^A-Za-z0-9._-]", "_", f"{folder_name(name)}-{key}.png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        lines += [f"{label}", "", f"![samples: {label}]({fig_dir.name}/samples/{dst.name})", ""]
    return "\n".join(lines) if len(lines) > 2 else ""


def figure(path: Path, draw, size=(6.0, 4.0)) -> Path:
    """Draw on a fresh matplotlib Axes (Agg, no global backend state) and save a PNG."""
    from matplotlib.figure import Figure  # imported here: matplotlib costs 0.3 s, which `rectflow --help` would pay
    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot()
    draw(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

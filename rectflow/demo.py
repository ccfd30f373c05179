"""The demo: sample the shipped default model, then train a small model from scratch on built-in data and sample it.

`rectflow demo` writes to demo_out/: default_model.png (the shipped model, rectflow/assets/default_model/, on fixed
prompts), scratch_model.png (the model trained here), and run/ (the training run: config, metrics.jsonl, TensorBoard
logs, sample grids during training, checkpoints). The training budget (default 12 minutes, about 15 in all on 2 CPU
cores) is turned into a step count by timing a few steps first, so the cosine schedule always runs to its end.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path


from rectflow.config import TrainConfig
from rectflow.config import recipe as load_recipe
from rectflow.devices import resolve_device
from rectflow.images import save_images
from rectflow.runs import CONFIG
from rectflow.pipeline import generate, load_pipeline
from rectflow.training import Trainer, train
from rectflow.training.data import default_prompts

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"

# The recipe: rectflow/recipes/demo.yaml (configs/demo.yaml links to it). Measured on 2 CPU cores: see
# docs/training.md "The demo recipe". Fields not named there keep TrainConfig's defaults.
DEMO_RECIPE = load_recipe("demo")


def recipe(**changes) -> TrainConfig:
    """The demo's training config, with changes."""
    return TrainConfig.from_dict({**DEMO_RECIPE, **changes}, source="demo recipe")


def demo_prompts() -> list[str]:
    """Fixed prompts in the built-in shapes' caption templates: one object, two objects, counts, relations."""
    return ["a red circle", "a blue square", "a green triangle", "a yellow circle and a purple square",
            "two red squares", "three blue circles", "a red circle to the left of a blue square",
            "a green triangle above a yellow square"]


def steps_for_budget(cfg: TrainConfig, run_dir: Path, minutes: float, probe_steps: int = 5) -> tuple[int, float]:
    """(max_steps that fit in `minutes`, measured img/s): time a few optimizer steps of the recipe (discarded)."""
    trainer = Trainer(dataclasses.replace(cfg, sample_every=0), run_dir)
    trainer.train_step()  # the first step pays one-off costs (allocations, text features of its captions)
    t0 = time.perf_counter()
    for _ in range(probe_steps):
        trainer.step = 0  # repeat step 0: its captions are cached, so the model step alone is timed
        trainer.train_step()
    per_step = (time.perf_counter() - t0) / probe_steps
    # text features of new captions (~1,500 for shapes, front-loaded), sample grids and checkpoints cost a few
    # percent of the budget: keep a margin
    return max(1, int(minutes * 60 * 0.92 / per_step)), cfg.batch_size / per_step


def sample_grid(pipe, prompts: list[str], out: Path, seed: int = 0) -> Path:
    """A captioned grid of the prompts (EMA weights, 25 Euler steps, CFG 3)."""
    settings = {"steps": 25, "solver": "euler", "cfg_scale": 3.0, "shift": pipe.train_config.get("shift", 1.0),
                "schedule": "linear", "seed": seed}
    images = generate(pipe, prompts, **settings)
    save_images(images, prompts, out, {**settings, "source": pipe.source})
    return out


def sample_default_model(out_dir: Path, prompts: list[str], device) -> Path | None:
    """Sample the shipped default model, or say clearly that it is absent."""
    if not DEFAULT_MODEL.is_dir() or not any(DEFAULT_MODEL.glob("*.safetensors")):
        print(f"rectflow demo: the shipped default model is not in this installation ({DEFAULT_MODEL} holds no "
              f"weights); skipping its samples", file=sys.stderr)
        return None
    pipe = load_pipeline(checkpoint=str(DEFAULT_MODEL), device=device)
    if pipe.train_config.get("data", "shapes") != "shapes":  # e.g. an emoji model: prompts from its own data
        prompts = default_prompts(TrainConfig.from_dict(pipe.train_config, source=str(DEFAULT_MODEL)))
    path = sample_grid(pipe, prompts, out_dir / "default_model.png")
    print(f"rectflow demo: default model samples -> {path}", file=sys.stderr)
    return path


def train_from_scratch(out_dir: Path, minutes: float, max_steps: int | None, device: str, seed: int) -> Path:
    """Train the recipe within the time budget (or for max_steps) and sample the result; returns the grid path."""
    run_dir = out_dir / "run"
    if run_dir.exists():
        if not (run_dir / CONFIG).is_file():
            raise FileExistsError(f"{run_dir} exists and is not a rectflow run; choose another --out")
        shutil.rmtree(run_dir)  # the demo's own earlier run
    cfg = recipe(device=device, seed=seed)
    if max_steps is None:
        steps, img_s = steps_for_budget(cfg, run_dir, minutes)
        print(f"rectflow demo: {img_s:.0f} img/s measured; training {steps} steps (~{minutes:g} min)",
              file=sys.stderr)
        cfg = dataclasses.replace(cfg, max_steps=steps)
    else:
        cfg = dataclasses.replace(cfg, max_steps=max_steps)
    every = cfg.max_steps // 6 or cfg.max_steps  # six grids and checkpoints along the way
    cfg = dataclasses.replace(cfg, checkpoint_every=every, sample_every=every)
    t0 = time.perf_counter()
    train(cfg, run_dir)
    print(f"rectflow demo: trained {cfg.max_steps} steps in {(time.perf_counter() - t0) / 60:.1f} min -> {run_dir}",
          file=sys.stderr)
    pipe = load_pipeline(run=str(run_dir), device=device)
    path = sample_grid(pipe, demo_prompts(), out_dir / "scratch_model.png", seed=seed)
    print(f"rectflow demo: from-scratch model samples -> {path}", file=sys.stderr)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow demo` options."""
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget in minutes (turned into a "
                        "step count by timing a few steps)")
    parser.add_argument("--max-steps", type=int, default=None, help="train exactly this many steps instead of "
                        "filling the time budget")
    parser.add_argument("--no-train", action="store_true", help="only sample the shipped default model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the from-scratch run and of the samples")


def run(args) -> int:
    """Entry point of `rectflow demo`."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    sample_default_model(out_dir, demo_prompts(), device)
    if not args.no_train:
        try:
            train_from_scratch(out_dir, args.minutes, args.max_steps, str(device), args.seed)
        except FileExistsError as err:
            print(f"rectflow demo: {err}", file=sys.stderr)
            return 2
    print(f"rectflow demo: done; see {out_dir}/", file=sys.stderr)
    return 0

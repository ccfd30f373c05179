"""Copy a training run's EMA weights into rectflow/assets/default_model/ as the shipped default model.

The weights are stored in bfloat16 (half the size; the repository keeps shipped files under ~20 MB) with the run's
metadata (model config, training config, step) unchanged, plus the run's config.yaml and a JSON summary of its
training metrics, so the shipped model says how it was made.

    python scripts/ship_default_model.py RUN_DIR [--step N]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from rectflow.files import atomic_path

DEST = Path(__file__).resolve().parent.parent / "rectflow" / "assets" / "default_model"


def checkpoint_dir(run: Path, step: int | None) -> Path:
    """The run's checkpoint at `step`, or its newest one."""
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    if step is not None:
        ckpts = [c for c in ckpts if int(c.name.split("_")[1]) == step]
    if not ckpts:
        raise SystemExit(f"{run}/checkpoints has no checkpoint" + (f" for step {step}" if step is not None else ""))
    return ckpts[-1]


def metrics_summary(run: Path, last_step: int | None = None) -> dict:
    """Loss at a few steps and the throughput, read off metrics.jsonl (up to last_step; default: all of it)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if last_step is None:
        last_step = max(r["step"] for r in rows)
    rows = [r for r in rows if r["step"] <= last_step]
    window = rows[-50:]
    return {"steps": last_step, "images_seen": None,
            "loss_first_50": sum(r["loss"] for r in rows[:50]) / max(1, len(rows[:50])),
            "loss_last_50": sum(r["loss"] for r in window) / max(1, len(window)),
            "img_s_median": sorted(r.get("img_per_s", 0.0) for r in rows)[len(rows) // 2] if rows else None}


def run_summary(run: Path, last_step: int | None = None) -> dict:
    """metrics_summary with the images seen; a run that started from another run's weights (`init` a run directory)
    also summarises that run, so a model trained in stages says so."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = metrics_summary(run, last_step)
    summary["images_seen"] = summary["steps"] * cfg["batch_size"]
    init = Path(cfg["init"]) if cfg.get("init") else None
    if init is not None and (init / "metrics.jsonl").is_file() and (init / "config.yaml").is_file():
        summary["init_run"] = run_summary(init)
        summary["total_steps"] = summary["init_run"].get("total_steps", summary["init_run"]["steps"]) + summary["steps"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    ckpt = checkpoint_dir(args.run, args.step)
    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
    with atomic_path(DEST / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    shutil.copyfile(args.run / "config.yaml", DEST / "config.yaml")
    summary = run_summary(args.run, int(metadata.get("rectflow.step", 0)))
    summary["weights"] = "EMA, stored in bfloat16"
    (DEST / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"shipped {ckpt} -> {DEST} ({(DEST / 'model.safetensors').stat().st_size / 1e6:.1f} MB): {summary}")


if __name__ == "__main__":
    main()

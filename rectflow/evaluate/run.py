"""Evaluate a training run: `rectflow eval --run runs/first --samples 120 --out runs/first/eval/eval.json`.

docs/paper.md §3's protocol at the scale of one machine, for the EMA and the raw weights of the run's latest
checkpoint:

- validation loss at 8 equally spaced t (rectflow.evaluate.val_loss), on the data set's validation split;
- for each sampler setting (Euler; 50 steps at CFG 1.0, 2.5 and 5.0; 5, 10 and 25 steps at CFG 5.0 by default),
  N samples with fixed noise: CLIP score against their prompts and FID against the validation split's real images,
  both with one image-text encoder (rectflow.evaluate.features), whose name goes with every number;
- on shapes, GenEval-style scores per category from the exact detector (rectflow.evaluate.geneval).

Prompts: on shapes, the fixed GenEval prompt set (shapes.eval_prompts, categories interleaved so any N is balanced);
elsewhere the captions of the validation split in order. Settings, prompts, FID reference, sampling and scoring are
rectflow.evaluate.protocol's, which the studies (`rectflow ablate`) use too. Writes the JSON report, a markdown table
(.md) and a plot (.png) side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rectflow.data import get_dataset
from rectflow.data.shapes import CATEGORIES
from rectflow.devices import resolve_device
from rectflow.evaluate import val_loss
from rectflow.evaluate.features import load_encoder
from rectflow.evaluate.nearest import glyph_indices, nearest_top1, reference_features
from rectflow.evaluate.protocol import (  # noqa: F401  (Setting, fingerprint: also this module's API)
    Setting,
    eval_set,
    fingerprint,
    generate_images,
    ground_truth_images,
    reference_fit,
    score_images,
)
from rectflow.files import atomic_path
from rectflow.runs import latest_checkpoint, resolve_weights
from rectflow.pipeline import load_model, load_pipeline

PAPER_SETTINGS = "50x1.0,50x2.5,50x5.0,5x5.0,10x5.0,25x5.0"  # steps x CFG scale (docs/paper.md §3)


def parse_settings(text: str) -> list[tuple[int, float]]:
    """'50x1.0,5x5.0' -> [(50, 1.0), (5, 5.0)]."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        steps, sep, cfg = item.partition("x")
        try:
            pair = (int(steps), float(cfg))
        except ValueError:
            pair = None
        if not sep or pair is None or pair[0] < 1 or pair[1] < 0:
            raise ValueError(f"--settings item {item!r}: expected STEPSxCFG such as 50x5.0")
        out.append(pair)
    if not out:
        raise ValueError("--settings: no sampler settings given")
    return out


# ---------------------------------------------------------------- the evaluation


def load_weights(ck_dir: Path, weights: str, pipe, device):
    """The pipeline with the `weights` ('ema' or 'raw') of checkpoint directory ck_dir."""
    path = resolve_weights(None, str(ck_dir), weights)
    model, _ = load_model(path, device)
    return dataclasses.replace(pipe, model=model, source=str(path), weights=weights)


def evaluate_run(run: str | None, samples: int = 120, settings: list[tuple[int, float]] | None = None,
                 weights: tuple[str, ...] = ("ema", "raw"), encoder_spec: str = "scorer", val_samples: int = 256,
                 ref_samples: int = 1000, seed: int = 0, batch_size: int = 64, shift: float | None = None,
                 device: str = "cpu", bf16: bool = False, cache_dir: str | None = None, progress: bool = True,
                 checkpoint: str | None = None, data: str | None = None) -> dict:
    """The whole protocol for one run (or, with checkpoint, for one weights file or checkpoint folder that carries
    its training config: the shipped model, a sharded run's consolidation); returns the JSON-serialisable report.
    data: the data set whose prompts, validation split and FID reference score the model, instead of the run's (a
    DPO run trained on preference pairs is scored on the data the pairs came from).

    Every weight set is read from the run's latest checkpoint at the start, even if the run writes a newer one
    meanwhile."""
    start = time.perf_counter()
    settings = settings or parse_settings(PAPER_SETTINGS)
    device = resolve_device(device)
    if checkpoint is not None:  # one weight set: the file's, or the folder's EMA (else its only file)
        pipe = load_pipeline(None, checkpoint, None, device)
        weights, ck_dir = (pipe.weights or "ema",), None
    else:
        ck_dir = latest_checkpoint(run)
        pipe = load_pipeline(run, None, weights[0], device, step_dir=ck_dir)
    cfg = pipe.train_config
    data, options = data or cfg.get("data", "shapes"), ({} if data else cfg.get("data_options") or {})
    shift = cfg.get("shift", 1.0) if shift is None else shift
    cache = Path(cache_dir) if cache_dir else Path(run or Path(checkpoint).parent) / "cache"
    encoder = load_encoder(encoder_spec, device=device)
    prompts, metas = eval_set(data, pipe.resolution, samples, seed, options)
    reference = reference_fit(encoder, data, pipe.resolution, ref_samples, options, cache)
    prompt_features = encoder.text_features(prompts)
    val = get_dataset(data, pipe.resolution, split="val", seed=0, **options)
    val_inputs = val_loss.validation_inputs(val, val_samples, pipe.text_encoder, pipe.autoencoder, device)
    glyphs = glyph_set(encoder, data, pipe.resolution, samples, seed, options)

    jobs = [Setting(w, steps, scale) for w in weights for steps, scale in settings]
    batches = range(0, len(prompts), batch_size)
    per_job = len(batches) * (2 if glyphs else 1)
    bar = tqdm(total=len(jobs) * per_job, unit="batch", desc="rectflow eval", disable=not progress)
    report = {"run": str(run or checkpoint), "encoder": encoder.name, "val_loss": {}, "fid": {}, "clip_score": {},
              "geneval": {} if metas is not None else None, "glyph_top1": {} if glyphs else None, "results": []}
    checkpoints = {}
    for i, w in enumerate(weights):
        if i:  # load_pipeline loaded the first weight set
            pipe = load_weights(ck_dir, w, pipe, device)
        checkpoints[w] = pipe.source
        report["val_loss"][w] = val_loss.validation_loss(pipe.model, pipe.formulation, *val_inputs, seed=seed,
                                                         batch_size=batch_size, bf16=bf16)
        for job in (j for j in jobs if j.weights == w):
            images = generate_images(pipe, prompts, job, shift=shift, seed=seed, batch_size=batch_size, bf16=bf16,
                                     on_batch=lambda: bar.update(1))
            result = {"label": job.label, "weights": w, "steps": job.steps, "cfg": job.cfg,
                      **score_images(images, prompt_features, encoder, reference["fit"], metas)}
            if metas is not None:
                report["geneval"][job.label] = result["geneval"]
            if glyphs:
                drawn = generate_images(pipe, glyphs["prompts"], job, shift=shift, seed=seed, batch_size=batch_size,
                                        bf16=bf16, on_batch=lambda: bar.update(1))
                result["glyph_top1"] = nearest_top1(encoder.image_features(drawn), glyphs["prompts"],
                                                    glyphs["features"], glyphs["train"].captions)
                report["glyph_top1"][job.label] = result["glyph_top1"]["top1"]
            report["fid"][job.label], report["clip_score"][job.label] = result["fid"], result["clip_score"]
            report["results"].append(result)
    bar.close()
    # the same metrics for real images of the same prompts: the floor of FID and ceiling of the others at this N
    truth = ground_truth_images(data, pipe.resolution, len(prompts), metas, options)
    report["ground_truth"] = score_images(truth, prompt_features, encoder, reference["fit"], metas)
    if glyphs:  # the training glyphs themselves: 1.0 unless two glyphs share features
        real = torch.stack([glyphs["train"][i]["image"] for i in glyphs["indices"]])
        report["ground_truth"]["glyph_top1"] = nearest_top1(encoder.image_features(real), glyphs["prompts"],
                                                            glyphs["features"], glyphs["train"].captions)
    report["settings"] = {
        "samples": len(prompts),
        "prompts": "shapes.eval_prompts (GenEval set)" if metas is not None else "val captions",
        "sampler": [{"solver": "euler", "steps": s, "cfg": c} for s, c in settings], "weights": list(weights),
        "shift": shift, "schedule": "linear", "seed": seed, "bf16": bf16, "device": str(device),
        "val_loss": {"t": list(val_loss.T_LEVELS), "samples": val_inputs[0].shape[0], "split": "val"},
        "fid_reference": {"data": data, "split": "val", "n": reference["n"], "cache": reference["cache"]},
        "checkpoints": checkpoints, "formulation": pipe.formulation.name, "data": data, "resolution": pipe.resolution,
        "clip_score_definition": "100 * max(cos, 0), mean over samples",
    }
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    return report


def glyph_set(encoder, data: str, resolution: int, n: int, seed: int, options: dict) -> dict | None:
    """On emoji, the nearest-glyph top-1 inputs (rectflow.evaluate.nearest): n training-glyph prompts and the
    encoder's features of every training glyph; None on other data."""
    if data != "emoji":
        return None
    train = get_dataset(data, resolution, split="train", seed=0, **options)
    indices = glyph_indices(train, n, seed)
    return {"train": train, "indices": indices, "prompts": [train.captions[i] for i in indices],
            "features": reference_features(encoder, train)}


# ---------------------------------------------------------------- outputs


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as markdown tables: val loss per level, then one row per sampler setting."""
    s = report["settings"]
    weights = ", ".join(f"{w} `{p}`" for w, p in s["checkpoints"].items())
    lines = [f"# rectflow eval: {report['run']}", "",
             f"Weights {weights}; formulation `{s['formulation']}`, data `{s['data']}` at "
             f"{s['resolution']} px. Encoder for CLIP score and FID: **{report['encoder']}**. "
             f"{s['samples']} samples per setting ({s['prompts']}), FID reference: {s['fid_reference']['n']} real "
             f"{s['fid_reference']['data']} val images. Euler, shift {s['shift']}, seed {s['seed']}.", "",
             "## Validation loss", "",
             "| weights | " + " | ".join(f"t={t:.4f}" for t in s["val_loss"]["t"]) + " | mean |",
             "|---|" + "---|" * (len(s["val_loss"]["t"]) + 1)]
    for w, v in report["val_loss"].items():
        lines.append(f"| {w} | " + " | ".join(_fmt(x, 4) for x in v["loss"]) + f" | {_fmt(v['mean'], 4)} |")
    geneval = report["geneval"] is not None
    head = ["weights", "steps", "CFG", f"FID ({report['encoder']})", f"CLIP score ({report['encoder']})"]
    if geneval:
        head += ["GenEval overall", *CATEGORIES]
    glyphs = report.get("glyph_top1") is not None
    if glyphs:
        head.append("glyph top-1")
    lines += ["", "## Samples", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    truth = {**report["ground_truth"], "weights": "real images", "steps": "-", "cfg": "-"}
    for r in report["results"] + [truth]:
        row = [r["weights"], str(r["steps"]), f"{r['cfg']:g}" if r["cfg"] != "-" else "-", _fmt(r["fid"], 2),
               _fmt(r["clip_score"], 2)]
        if geneval:
            row += [_fmt(r["geneval"]["overall"])] + [_fmt(r["geneval"].get(c)) for c in CATEGORIES]
        if glyphs:
            row.append(_fmt(r["glyph_top1"]["top1"]))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "The last row scores real images of the same prompts (renders of the shapes scenes, or the "
              "validation images the captions belong to, which are also in the FID reference): the FID floor and the "
              "CLIP score at this sample count."]
    if glyphs:
        n = report["ground_truth"]["glyph_top1"]["n"]
        lines += ["", f"Glyph top-1 (rectflow.evaluate.nearest): {n} more samples per setting, prompted with training "
                  "glyphs' captions; the share whose nearest training glyph (cosine of the encoder's image features) "
                  f"is the prompted one. Chance: {report['ground_truth']['glyph_top1']['chance']:.5f}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Validation loss per t, FID against CLIP score per setting, and GenEval overall per setting."""
    import matplotlib  # imported here: matplotlib costs 0.35 s, which `rectflow --help` would pay
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geneval = report["geneval"] is not None
    fig, axes = plt.subplots(1, 3 if geneval else 2, figsize=(15 if geneval else 10, 4))
    ax = axes[0]
    for w, v in report["val_loss"].items():
        ax.plot(v["t"], v["loss"], marker="o", label=f"{w} (mean {v['mean']:.4f})")
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="validation loss", title="validation loss per t")
    ax.legend()
    ax = axes[1]
    for r in report["results"]:
        if r["fid"] is not None:
            ax.scatter(r["clip_score"], r["fid"], marker="o" if r["weights"] == "ema" else "x")
            ax.annotate(f"{r['weights']} {r['steps']}/{r['cfg']:g}", (r["clip_score"], r["fid"]), fontsize=7)
    truth = report["ground_truth"]  # as text: a point this far away would squash the settings together
    ax.text(0.02, 0.02, f"real images: FID {truth['fid']:.2f}, CLIP score {truth['clip_score']:.2f}",
            transform=ax.transAxes, fontsize=8)
    ax.ticklabel_format(useOffset=False)
    ax.set(xlabel=f"CLIP score ({report['encoder']})", ylabel=f"FID ({report['encoder']})",
           title="FID vs CLIP score (lower right is better)")
    if geneval:
        ax = axes[2]
        labels = [f"{r['weights']}\n{r['steps']}/{r['cfg']:g}" for r in report["results"]]
        ax.bar(range(len(labels)), [r["geneval"]["overall"] for r in report["results"]])
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.axhline(truth["geneval"]["overall"], linestyle="--", color="black", label="real images")
        ax.legend(loc="upper right")
        ax.set(ylabel="GenEval overall", ylim=(0, 1.05), title="GenEval-style score (shapes detector)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> tuple[Path, Path, Path]:
    """JSON, markdown and plot side by side: all three rendered to temp files first, then renamed into place, the
    JSON last; a failure or kill on the way leaves every file whole (old or new), never part of one."""
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    # nested: on success the innermost is renamed first (md, png, then the JSON); on an error none is
    with atomic_path(out) as tmp_json, atomic_path(png) as tmp_png, atomic_path(md) as tmp_md:
        tmp_md.write_text(markdown(report))
        plot(report, tmp_png)
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
    return out, md, png


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow eval` options."""
    parser.add_argument("--run", default=None, help="training run directory (config.yaml + checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="instead of --run: a rectflow weights file or checkpoint "
                        "folder with its training config (e.g. rectflow/assets/default_model); needs --out")
    parser.add_argument("--out", default=None, help="JSON report; the .md table and .png plot go beside it "
                        "(default: RUN/eval/eval.json)")
    parser.add_argument("--data", default=None, help="score on this data set's prompts, validation split and FID "
                        "reference instead of the run's (e.g. shapes for a DPO run on preference pairs)")
    parser.add_argument("--samples", type=int, default=120, help="samples per sampler setting (and weight set)")
    parser.add_argument("--settings", default=PAPER_SETTINGS, help="Euler sampler settings, comma-separated "
                        "STEPSxCFG (default: docs/paper.md §3's six)")
    parser.add_argument("--weights", nargs="+", choices=("ema", "raw"), default=["ema", "raw"],
                        help="weight sets of the latest checkpoint to evaluate")
    parser.add_argument("--encoder", default="scorer", help="image-text encoder for CLIP score and FID: 'scorer' "
                        "(shipped offline scorer), 'scorer:FILE.safetensors' or 'clip:DIR' (a transformers CLIPModel)")
    parser.add_argument("--val-samples", type=int, default=256, help="validation images for the validation loss")
    parser.add_argument("--ref-samples", type=int, default=1000, help="real validation images in the FID reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, the sampling noise and the "
                        "validation-loss noise")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model batch")
    parser.add_argument("--shift", type=float, default=None, help="time-grid shift (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bf16 autocast for the model (faster; not bit-reproducible across devices)")
    parser.add_argument("--cache-dir", default=None, help="where the FID reference features are cached "
                        "(default: RUN/cache)")


def run(args) -> int:
    """Entry point of `rectflow eval`."""
    try:
        device = resolve_device(args.device)
        if args.samples < 2:
            raise ValueError(f"--samples must be at least 2 (FID needs two samples), got {args.samples}")
        if (args.run is None) == (args.checkpoint is None):
            raise ValueError("give exactly one of --run DIR or --checkpoint PATH")
        if args.checkpoint is not None and args.out is None:
            raise ValueError("--checkpoint needs --out (where the report goes)")
        report = evaluate_run(args.run, args.samples, parse_settings(args.settings), tuple(args.weights),
                              args.encoder, args.val_samples, args.ref_samples, args.seed, args.batch_size,
                              args.shift, device, args.bf16, args.cache_dir, checkpoint=args.checkpoint,
                              data=args.data)
    except (ValueError, FileNotFoundError) as err:
        print(f"rectflow eval: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "eval" / "eval.json"
    paths = write_outputs(report, out)
    print(markdown(report))
    print(f"rectflow eval: wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0

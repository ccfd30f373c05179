"""How the studies score a run, through rectflow.evaluate: sampler settings, generated images scored by CLIP score,
FID and (shapes) GenEval-style prompt following against fixed prompts; the training loss at the end of a run.

The protocol is `rectflow eval`'s (rectflow.evaluate.protocol, docs/evaluation.md), the same for every run of a study:
on shapes the GenEval prompt set, elsewhere the validation captions; FID against the first real validation images;
image i of every setting starts from the same noise (seed + i), so differences between runs are not sampling noise
of the starting points. Two choices differ from `rectflow eval`'s defaults: sampling runs under the run's own bf16
setting (the studies' budgets assume it), and each setting's scores are cached on their own, so an interrupted
evaluation resumes. Scores carry the protocol's metric keys (fid, clip_score, geneval); cached files and results of
runs made before those keys were shared are read through normalize_scores / normalize_result.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rectflow.data import get_dataset
from rectflow.evaluate.features import load_encoder
from rectflow.evaluate.protocol import (
    Setting,
    eval_set,
    fid,
    generate_images,
    normalize_scores,
    reference_fit,
    score_images,
)
from rectflow.evaluate.val_loss import validation_inputs, validation_loss
from rectflow.files import atomic_path, file_lock, read_jsonl
from rectflow.images import make_grid, to_pil
from rectflow.runs import METRICS
from rectflow.pipeline import Pipeline
from rectflow.studies.common import StudyOptions, cached

EVAL_BATCH = 64  # images per sampling batch


class Evaluation:
    """What every run of a study is scored on, with `rectflow eval`'s protocol (rectflow.evaluate.protocol): its
    prompts (on shapes the GenEval prompt set, categories interleaved), its FID reference (the first real images of
    the validation split), the image-text encoder and, on shapes, the GenEval-style detector."""

    _encoders: dict = {}

    def __init__(self, opts: StudyOptions, resolution: int, data_options: dict | None = None):
        self.opts, self.resolution, self.data_options = opts, resolution, dict(data_options or {})
        self.captions, self.metas = eval_set(opts.data, resolution, opts.n_samples, opts.seed, self.data_options)
        self._reference = None

    @property
    def encoder(self):
        """The image-text encoder (one per process and spec)."""
        spec = self.opts.encoder
        if spec not in Evaluation._encoders:
            Evaluation._encoders[spec] = load_encoder(spec, device=self.opts.torch_device()).eval()
        return Evaluation._encoders[spec]

    def reference(self):
        """Gaussian fit of the encoder's features of the real reference images (cached in the study's folder)."""
        if self._reference is None:
            cache = self.opts.study_dir / "cache"
            with file_lock(cache / ".fid-reference.lock"):  # workers share the cached fit
                self._reference = reference_fit(self.encoder, self.opts.data, self.resolution, self.opts.n_reference,
                                                self.data_options, cache)["fit"]
        return self._reference

    def fid(self, images: torch.Tensor) -> float:
        """FID of images against the reference set."""
        return fid(images, self.encoder, self.reference())

    def score(self, images: torch.Tensor) -> dict:
        """score_images' metrics (fid, clip_score, on shapes geneval) of images generated for self.captions, with the
        number of images and the encoder's name."""
        enc = self.encoder
        scores = score_images(images, enc.text_features(self.captions), enc, self.reference(), self.metas)
        return {**scores, "n": len(images), "encoder": enc.name}

    def generate(self, trainer, setting: Setting) -> torch.Tensor:
        """Images for self.captions from the run's EMA or raw weights with one sampler setting."""
        model = {"ema": trainer.ema, "raw": trainer.model}[setting.weights].eval()
        pipe = Pipeline(model, trainer.formulation, trainer.text, trainer.autoencoder, self.resolution)
        return generate_images(pipe, self.captions, setting, shift=trainer.cfg.shift, seed=self.opts.seed,
                               batch_size=EVAL_BATCH, bf16=trainer.bf16)

    def evaluate(self, trainer, run_dir: Path, settings: list[Setting]) -> dict:
        """Scores per setting, each cached in run_dir/eval/<key>.json (an interrupted evaluation resumes; files
        written before the metric keys were shared are read with normalize_scores)."""
        results = {}
        for s in settings:
            def compute(s=s):
                t0 = time.perf_counter()
                images = self.generate(trainer, s)
                save_grid(images[:8], self.captions[:8], Path(run_dir) / "eval" / f"{s.key}.png")
                return {**self.score(images), "seconds": time.perf_counter() - t0}
            results[s.key] = normalize_scores(cached(Path(run_dir) / "eval" / f"{s.key}.json", compute))
        return results


def normalize_result(result: dict | None) -> dict | None:
    """A run's result.json with every setting's scores in the shared metric keys (normalize_scores)."""
    if not result or not isinstance(result.get("scores"), dict):
        return result
    return {**result, "scores": {k: normalize_scores(v) for k, v in result["scores"].items()}}


def save_grid(images: torch.Tensor, captions: list[str], path: Path) -> None:
    """A captioned grid of a few generated images (the report's sample figures)."""
    grid = make_grid([to_pil(im) for im in images], captions, tile=64, columns=len(images))
    with atomic_path(path) as tmp:
        grid.save(tmp)


_EVALUATIONS: dict = {}


def evaluation(opts: StudyOptions, cfg) -> Evaluation:
    """The study's Evaluation for runs of a training config (built once per process and data/resolution)."""
    key = json.dumps([opts.eval_spec(), str(opts.study_dir), cfg.data, cfg.resolution, cfg.data_options])
    if key not in _EVALUATIONS:
        _EVALUATIONS[key] = Evaluation(opts, cfg.resolution, cfg.data_options)
    return _EVALUATIONS[key]


def final_loss(run_dir: Path, fraction: float = 0.1) -> float | None:
    """Mean training loss over the last `fraction` of the steps in metrics.jsonl (skipped steps left out)."""
    losses = [rec.get("loss") for rec in read_jsonl(Path(run_dir) / METRICS)]
    tail = [x for x in losses[-max(1, int(len(losses) * fraction)):] if x is not None]
    return sum(tail) / len(tail) if tail else None


class ValLossCurve:
    """Validation loss (rectflow.evaluate.val_loss: 8 levels of t, fixed noise) of EMA and raw weights at each
    checkpoint, appended to run_dir/val_loss.jsonl; a trainer hook (common.trained's on_checkpoint)."""

    def __init__(self, run_dir: Path, n_items: int, seed: int = 0):
        self.path = Path(run_dir) / "val_loss.jsonl"
        self.n_items, self.seed = n_items, seed
        self._inputs = None

    def records(self) -> list[dict]:
        """The curve so far, one record per step (the last written for a step), in step order."""
        recs = {rec["step"]: rec for rec in read_jsonl(self.path)}  # read_jsonl skips a line cut short by a kill
        return [recs[k] for k in sorted(recs)]

    def __call__(self, trainer) -> None:
        """Add the trainer's current step (once)."""
        if any(r["step"] == trainer.step for r in self.records()):
            return
        cfg = trainer.cfg
        if self._inputs is None:
            val = get_dataset(cfg.data, cfg.resolution, split="val", **cfg.data_options)
            self._inputs = validation_inputs(val, self.n_items, trainer.text, trainer.autoencoder, trainer.device)
        rec = {"step": trainer.step}
        for weights, model in (("ema", trainer.ema), ("raw", trainer.model)):
            was_training = model.training
            out = validation_loss(model.eval(), trainer.formulation, *self._inputs, seed=self.seed, bf16=trainer.bf16)
            model.train(was_training)
            rec[weights], rec[f"{weights}_levels"] = out["mean"], out["loss"]
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

"""How the studies score a run, through rectflow.evaluate: sampler settings, generated images scored by CLIP score,
FID and (shapes) GenEval-style prompt following against fixed prompts; the training loss at the end of a run.

The protocol is `rectflow eval`'s (rectflow.evaluate.run, docs/evaluation.md), the same for every run of a study:
on shapes the GenEval prompt set, elsewhere the validation captions; FID against the first real validation images;
image i of every setting starts from the same noise (seed + i), so differences between runs are not sampling noise
of the starting points. Two choices differ from `rectflow eval`'s defaults: sampling runs under the run's own bf16
setting (the studies' budgets assume it), and each setting's scores are cached on their own, so an interrupted
evaluation resumes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rectflow.studies.common import StudyOptions, cached, file_lock

EVAL_BATCH = 64  # images per sampling batch


@dataclass(frozen=True)
class Setting:
    """One sampler setting of an evaluation (Euler unless said otherwise)."""

    steps: int
    cfg: float
    weights: str = "ema"
    shift: float | None = None  # None: the run's training shift
    solver: str = "euler"

    @property
    def key(self) -> str:
        """A file-name-safe key, e.g. ema-euler50-cfg5-shift1."""
        shift = "train" if self.shift is None else f"{self.shift:g}"
        return f"{self.weights}-{self.solver}{self.steps}-cfg{self.cfg:g}-shift{shift}"


class Evaluation:
    """What every run of a study is scored on, with `rectflow eval`'s protocol (rectflow.evaluate.run): its prompts
    (on shapes the GenEval prompt set, categories interleaved), its FID reference (the first real images of the
    validation split), the image-text encoder and, on shapes, the GenEval-style detector."""

    _encoders: dict = {}

    def __init__(self, opts: StudyOptions, resolution: int, data_options: dict | None = None):
        from rectflow.evaluate.run import eval_set
        self.opts, self.resolution, self.data_options = opts, resolution, dict(data_options or {})
        self.captions, self.metas = eval_set(opts.data, resolution, opts.n_samples, opts.seed, self.data_options)
        self._reference = None

    @property
    def encoder(self):
        """The image-text encoder (one per process and spec)."""
        from rectflow.evaluate.features import load_encoder
        spec = self.opts.encoder
        if spec not in Evaluation._encoders:
            Evaluation._encoders[spec] = load_encoder(spec, device=self.opts.torch_device()).eval()
        return Evaluation._encoders[spec]

    def reference(self):
        """Gaussian fit of the encoder's features of the real reference images (cached in the study's folder)."""
        from rectflow.evaluate.run import reference_fit
        if self._reference is None:
            cache = self.opts.study_dir / "cache"
            with file_lock(cache / ".fid-reference.lock"):  # workers share the cached fit
                self._reference = reference_fit(self.encoder, self.opts.data, self.resolution, self.opts.n_reference,
                                                self.data_options, cache)["fit"]
        return self._reference

    def fid(self, images: torch.Tensor) -> float:
        """FID of images against the reference set."""
        from rectflow.evaluate.frechet import GaussianFit, frechet_distance
        return float(frechet_distance(GaussianFit.of(self.encoder.image_features(images)), self.reference()))

    def score(self, images: torch.Tensor) -> dict:
        """CLIP score, FID and (shapes) GenEval-style scores of images generated for self.captions."""
        from rectflow.evaluate.clip_score import scores_from_features
        from rectflow.evaluate.frechet import GaussianFit, frechet_distance
        enc = self.encoder
        feats = enc.image_features(images)
        out = {"clip": float(scores_from_features(feats, enc.text_features(self.captions)).mean()),
               "fid": float(frechet_distance(GaussianFit.of(feats), self.reference())), "n": len(images),
               "encoder": enc.name}
        if self.metas is not None:
            from rectflow.evaluate.geneval import geneval_scores
            scores = geneval_scores(self.metas, images)
            out["geneval"] = scores["overall"]
            out["geneval_categories"] = {k: v for k, v in scores.items() if k not in ("overall", "counts")}
        return out

    def generate(self, trainer, setting: Setting) -> torch.Tensor:
        """Images for self.captions from the run's EMA or raw weights with one sampler setting."""
        from rectflow.sample import Pipeline, generate
        model = {"ema": trainer.ema, "raw": trainer.model}[setting.weights].eval()
        pipe = Pipeline(model, trainer.formulation, trainer.text, trainer.autoencoder, self.resolution)
        shift = trainer.cfg.shift if setting.shift is None else setting.shift
        return generate(pipe, self.captions, steps=setting.steps, solver=setting.solver, cfg_scale=setting.cfg,
                        shift=shift, seed=self.opts.seed, batch_size=EVAL_BATCH, bf16=trainer.cfg.bf16)

    def evaluate(self, trainer, run_dir: Path, settings: list[Setting]) -> dict:
        """Scores per setting, each cached in run_dir/eval/<key>.json (an interrupted evaluation resumes)."""
        results = {}
        for s in settings:
            def compute(s=s):
                t0 = time.perf_counter()
                images = self.generate(trainer, s)
                save_grid(images[:8], self.captions[:8], Path(run_dir) / "eval" / f"{s.key}.png")
                return {**self.score(images), "seconds": time.perf_counter() - t0}
            results[s.key] = cached(Path(run_dir) / "eval" / f"{s.key}.json", compute)
        return results


def save_grid(images: torch.Tensor, captions: list[str], path: Path) -> None:
    """A captioned grid of a few generated images (the report's sample figures)."""
    from rectflow.sample import make_grid, to_pil
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([to_pil(im) for im in images], captions, tile=64, columns=len(images)).save(path)


_EVALUATIONS: dict = {}


def evaluation(opts: StudyOptions, cfg) -> Evaluation:
    """The study's Evaluation for runs of a training config (built once per process and data/resolution)."""
    key = json.dumps([opts.eval_spec(), str(opts.study_dir), cfg.data, cfg.resolution, cfg.data_options])
    if key not in _EVALUATIONS:
        _EVALUATIONS[key] = Evaluation(opts, cfg.resolution, cfg.data_options)
    return _EVALUATIONS[key]


def final_loss(run_dir: Path, fraction: float = 0.1) -> float | None:
    """Mean training loss over the last `fraction` of the steps in metrics.jsonl (skipped steps left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = []
    for line in path.read_text().splitlines():
        try:
            losses.append(json.loads(line).get("loss"))
        except json.JSONDecodeError:
            continue
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
        """The curve so far, one record per step, in step order."""
        if not self.path.is_file():
            return []
        recs = {}
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            recs[rec["step"]] = rec
        return [recs[k] for k in sorted(recs)]

    def __call__(self, trainer) -> None:
        """Add the trainer's current step (once)."""
        from rectflow.data import get_dataset
        from rectflow.evaluate.val_loss import validation_inputs, validation_loss
        if any(r["step"] == trainer.step for r in self.records()):
            return
        cfg = trainer.cfg
        if self._inputs is None:
            val = get_dataset(cfg.data, cfg.resolution, split="val", **cfg.data_options)
            self._inputs = validation_inputs(val, self.n_items, trainer.text, trainer.autoencoder, trainer.device)
        rec = {"step": trainer.step}
        for weights, model in (("ema", trainer.ema), ("raw", trainer.model)):
            was_training = model.training
            out = validation_loss(model.eval(), trainer.formulation, *self._inputs, seed=self.seed, bf16=cfg.bf16)
            model.train(was_training)
            rec[weights], rec[f"{weights}_levels"] = out["mean"], out["loss"]
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

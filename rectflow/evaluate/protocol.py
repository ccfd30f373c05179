"""The evaluation protocol shared by `rectflow eval` (rectflow.evaluate.run) and the studies
(rectflow.studies.evaluation): sampler settings, the prompt set, the FID reference, generating a setting's images
and scoring them, with one set of metric keys.

    Setting          weights x solver x steps x CFG (x sampling shift): `.label` for reports, `.key` for file names
    eval_set         on shapes the GenEval prompt set (categories interleaved, so any N is balanced), elsewhere the
                     validation captions in order
    reference_fit    Gaussian fit of the encoder's features of the first real validation images (FID's reference)
    generate_images  a setting's images from a Pipeline; image i starts from the noise of seed + i in every setting
    score_images     the metrics of one image set, keyed by METRICS

Metric keys (METRICS): `fid`, `clip_score` (100 * max(cos, 0), mean over the images) and, on shapes, `geneval` (a
dict: per-category accuracy, `overall`, `counts`). Study evaluations cached before these keys were shared used `clip`,
a float `geneval` (the overall score) and `geneval_categories`; normalize_scores reads both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from rectflow import sample
from rectflow.data import get_dataset
from rectflow.data.shapes import CATEGORIES, caption_for, eval_prompts, render_scene, to_tensor
from rectflow.evaluate.clip_score import scores_from_features
from rectflow.evaluate.frechet import GaussianFit, frechet_distance
from rectflow.evaluate.geneval import geneval_scores
from rectflow.files import atomic_path

METRICS = ("fid", "clip_score", "geneval")  # the keys of score_images (geneval on shapes only)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler setting for one weight set ('ema' or 'raw'); shift None: the run's (or the caller's) shift."""

    weights: str
    steps: int
    cfg: float
    shift: float | None = None
    solver: str = "euler"

    @property
    def label(self) -> str:
        """For reports, e.g. ema/euler-50/cfg-5 (with /shift-S when the setting fixes its own shift)."""
        shift = "" if self.shift is None else f"/shift-{self.shift:g}"
        return f"{self.weights}/{self.solver}-{self.steps}/cfg-{self.cfg:g}{shift}"

    @property
    def key(self) -> str:
        """A file-name-safe key, e.g. ema-euler50-cfg5-shifttrain (shift 'train': the run's training shift)."""
        shift = "train" if self.shift is None else f"{self.shift:g}"
        return f"{self.weights}-{self.solver}{self.steps}-cfg{self.cfg:g}-shift{shift}"


# ---------------------------------------------------------------- prompts and reference set


def eval_set(data: str, resolution: int, n: int, seed: int, data_options: dict) -> tuple[list[str], list[dict] | None]:
    """(prompts, shapes metas or None) for n samples per setting."""
    if data == "shapes":
        categories = tuple(data_options.get("categories") or CATEGORIES)
        per = math.ceil(n / len(categories))
        metas = eval_prompts(per, seed=seed, categories=categories)
        # category-major -> interleaved, so the first n cover every category evenly
        metas = [metas[c * per + i] for i in range(per) for c in range(len(categories))][:n]
        return [caption_for(m) for m in metas], metas
    val = get_dataset(data, resolution, split="val", seed=0, **data_options)
    if len(val) == 0:
        raise ValueError(f"data set {data!r} has an empty validation split: no prompts and no FID reference")
    return [val[i % len(val)]["caption"] for i in range(n)], None


def ground_truth_images(data: str, resolution: int, n: int, metas: list[dict] | None, data_options: dict):
    """Real images for the prompts: renders of the shapes metas, else the validation items the captions came from."""
    if metas is not None:
        return torch.stack([to_tensor(render_scene(m, resolution)) for m in metas])
    val = get_dataset(data, resolution, split="val", seed=0, **data_options)
    return torch.stack([val[i % len(val)]["image"] for i in range(n)])


def fingerprint(encoder) -> str:
    """A short digest of an encoder's name and weights (first bytes of every tensor), for cache keys."""
    h = hashlib.sha256(encoder.name.encode())
    for key, value in encoder.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_fit(encoder, data: str, resolution: int, n: int, data_options: dict, cache_dir: Path | None) -> dict:
    """Gaussian fit of the encoder's features of the first n real validation images, cached as safetensors (written
    atomically, so processes sharing the cache never read half a file)."""
    val = get_dataset(data, resolution, split="val", seed=0, **data_options)
    n = min(n, len(val))
    key = hashlib.sha256(json.dumps([fingerprint(encoder), data, resolution, n, data_options],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"fid-reference-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        fit = GaussianFit.from_state_dict(safetensors.torch.load_file(str(path)))
        return {"fit": fit, "n": n, "cache": str(path), "cached": True}
    feats = torch.cat([encoder.image_features(torch.stack([val[i]["image"] for i in range(lo, min(n, lo + 64))]))
                       for lo in range(0, n, 64)])
    fit = GaussianFit.of(feats)
    if path is not None:
        with atomic_path(path) as tmp:  # a concurrent reader sees no file or the whole file
            safetensors.torch.save_file(fit.state_dict(), str(tmp),
                                        metadata={"encoder": encoder.name, "data": data, "n": str(n)})
    return {"fit": fit, "n": n, "cache": str(path) if path else None, "cached": False}


# ---------------------------------------------------------------- images and their scores


def generate_images(pipe, prompts: list[str], setting: Setting, shift: float = 1.0, seed: int = 0,
                    batch_size: int = 64, bf16: bool = False, on_batch: Callable[[], None] | None = None):
    """The setting's images [N, 3, H, W] for the prompts from a sample.Pipeline holding its weights; `shift` is used
    when the setting has none. Image i starts from the noise of seed + i; on_batch() after each batch (progress)."""
    shift = shift if setting.shift is None else setting.shift
    images = []
    for lo in range(0, len(prompts), batch_size):
        images.append(sample.generate(pipe, prompts[lo:lo + batch_size], steps=setting.steps, solver=setting.solver,
                                      cfg_scale=setting.cfg, shift=shift, seed=seed + lo, batch_size=batch_size,
                                      bf16=bf16))
        if on_batch is not None:
            on_batch()
    return torch.cat(images)


def fid(images, encoder, reference: GaussianFit) -> float:
    """FID of images against the reference fit, on the encoder's image features."""
    return frechet_distance(GaussianFit.of(encoder.image_features(images)), reference)


def score_images(images, prompt_features, encoder, reference: GaussianFit, metas) -> dict:
    """FID against the reference, CLIP score against the prompts and (shapes) GenEval scores of one image set."""
    feats = encoder.image_features(images)
    out = {"fid": frechet_distance(GaussianFit.of(feats), reference),
           "clip_score": float(scores_from_features(feats, prompt_features).mean())}
    if metas is not None:
        out["geneval"] = geneval_scores(metas, images)
    return out


def metric_value(scores: dict, name: str) -> float | None:
    """One metric of score_images' output as a number (geneval: its overall score); None when absent."""
    value = scores.get(name)
    return value.get("overall") if isinstance(value, dict) else value


def normalize_scores(scores: dict) -> dict:
    """Scores with METRICS' keys, from either layout: old study caches hold `clip`, a float `geneval` (overall) and
    `geneval_categories`; those become `clip_score` and a `geneval` dict (categories and `overall`). Other fields
    (n, encoder, seconds) are kept."""
    out = dict(scores)
    if "clip" in out and "clip_score" not in out:
        out["clip_score"] = out.pop("clip")
    if isinstance(out.get("geneval"), (int, float)):
        out["geneval"] = {**(out.pop("geneval_categories", None) or {}), "overall": out["geneval"]}
    return out

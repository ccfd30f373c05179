"""Evaluation (docs/paper.md §3): validation loss, CLIP score and FID with pluggable image-text encoders,
GenEval-style scores.

    val_loss    the model's own objective at 8 equally spaced t, fixed noise and data
    encoder     the image-text encoder interface (ImageTextEncoder)
    features    image-text encoders: a transformers CLIPModel from a local folder, or the shipped offline scorer
    clip_score  100 * max(cos, 0) between image and caption embeddings
    frechet     Frechet distance between Gaussian fits of image features (FID)
    scorer      the small CLIP-style scorer trained on the built-in data (`rectflow train-scorer`)
    geneval     the exact shapes detector and per-category prompt-following scores
    protocol    what `rectflow eval` and the studies share: settings, prompts, FID reference, sampling, scoring
    run         `rectflow eval --run DIR`: all of the above for a training run

docs/evaluation.md describes the protocol and every definition.
"""
from rectflow.evaluate.clip_score import clip_score, clip_scores
from rectflow.evaluate.features import CLIPEncoder, ImageTextEncoder, load_encoder
from rectflow.evaluate.frechet import GaussianFit, fid, frechet_distance
from rectflow.evaluate.geneval import ShapesDetector, geneval_scores
from rectflow.evaluate.val_loss import T_LEVELS, validation_loss

__all__ = ["clip_score", "clip_scores", "CLIPEncoder", "ImageTextEncoder", "load_encoder", "GaussianFit", "fid",
           "frechet_distance", "ShapesDetector", "geneval_scores", "T_LEVELS", "validation_loss"]

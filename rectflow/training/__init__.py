"""Training (`rectflow train`), one job per module, laid out as torchtitan lays out a trainer:

    loop.py          Trainer: the loop, one optimizer step, logging, sample grids
    checkpoint.py    weights + training state per checkpoint, resume
    data.py          which items each step reads, latent and text-feature caches
    model.py         the network a config asks for, the loss of one batch
    optim.py         AdamW, learning-rate schedule, EMA
    randomness.py    seeded generators per (seed, step, purpose), RNG state
    distributed.py   torchrun process group and collectives
    cli.py           `rectflow train`'s flags and entry point
"""
from rectflow.training.checkpoint import load_state, save_checkpoint
from rectflow.training.loop import Trainer, TrainingAborted, train
from rectflow.training.model import build_model, compute_loss, context_splits, warn_patch_bottleneck

__all__ = ["Trainer", "TrainingAborted", "train", "build_model", "compute_loss", "context_splits",
           "warn_patch_bottleneck", "load_state", "save_checkpoint"]

"""`rectflow train` (the code is in rectflow.training); this module keeps the names it used to define importable."""
from rectflow.config import RESUME_CHANGEABLE  # noqa: F401
from rectflow.runs import find_checkpoint  # noqa: F401
from rectflow.training.checkpoint import STATE_VERSION, load_state, save_checkpoint, save_weights  # noqa: F401
from rectflow.training.cli import add_arguments, check_resume_changes, config_from_args, run  # noqa: F401
from rectflow.training.data import (ENDLESS, Batches, TextFeatures, all_captions, default_prompts,  # noqa: F401
                                    frozen_text_encoder, step_indices)
from rectflow.training.loop import Trainer, TrainingAborted, train  # noqa: F401
from rectflow.training.model import build_model, compute_loss, context_splits, warn_patch_bottleneck  # noqa: F401
from rectflow.training.optim import ema_decay_at, ema_update, lr_at, make_optimizer  # noqa: F401
from rectflow.training.randomness import generator_for, seed_for  # noqa: F401

_frozen_text_encoder = frozen_text_encoder  # the old private name, used by tests

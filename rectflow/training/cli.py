"""Train an MM-DiT with any formulation: `rectflow train --data shapes --max-steps 20 --out runs/first`.

The command line over rectflow.training.Trainer: Defaults < --config FILE < one flag per config field <
--set KEY=VALUE; --resume continues the run in --out, refusing config changes that would break exact continuation.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from rectflow.checkpoints import train_config_of
from rectflow.config import (FIELDS, RESUME_CHANGEABLE, TrainConfig, apply_dict, apply_overrides, field_type,
                             load_config, parse_override)
from rectflow.files import check_safetensors
from rectflow.runs import CONFIG, WEIGHT_FILES, find_checkpoint
from rectflow.training import distributed
from rectflow.training.finetune import inherit_from_init
from rectflow.training.loop import Trainer, TrainingAborted


def _flag(name: str) -> str:
    """Field name -> command-line flag."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow train` options: the run, the config file, overrides, and one flag per config field."""
    parser.add_argument("--out", default=None, help="run directory (config.yaml, checkpoints, logs, samples); "
                        "default runs/<date-time>")
    parser.add_argument("--config", default=None, help="YAML file of config fields (see configs/ and "
                        "docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (value parsed as YAML; repeatable; applied last); "
                             "data_options.NAME=VALUE sets one data option")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                        "(exactly: the same losses as an uninterrupted run)")
    parser.add_argument("--resume-from-last-good", action="store_true", help="with --resume (implied): when the "
                        "newest checkpoint is damaged, continue from the newest one that loads (nothing is deleted)")
    parser.add_argument("--allow-config-change", action="store_true", help="with --resume: accept a config.yaml "
                        "edited by hand since the run's last checkpoint, and changes of fields that break exact "
                        "continuation (the run then differs from an uninterrupted one)")
    group = parser.add_argument_group("config fields (defaults shown; see docs/training.md)")
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        tp, nullable = field_type(name)
        base = getattr(tp, "__origin__", tp)
        default = getattr(defaults, name)
        help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        kw = dict(default=argparse.SUPPRESS, help=help_text, dest=f"cfg_{name}")
        if base is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif base is list:
            group.add_argument(_flag(name), nargs="+", type=float if name == "betas" else str,
                               metavar=name[:-1].upper() if name.endswith("s") else name.upper(), **kw)
        elif base is dict:
            continue  # only through the config file or --set data_options.NAME=VALUE
        else:
            choices = f.metadata.get("choices")
            group.add_argument(_flag(name), type=base, choices=choices, metavar=None if choices else name.upper(), **kw)


def config_from_args(args) -> TrainConfig:
    """Defaults < --config < direct flags < --set; on --resume the run's saved config replaces the defaults, and
    --config, flags and --set act on it as overrides that may only change RESUME_CHANGEABLE fields."""
    saved = Path(args.out) / CONFIG if args.out else None
    if args.resume:
        if saved is None or not saved.is_file():
            raise ValueError(f"--resume: no run to continue in {args.out!r} (config.yaml missing)")
        base = load_config(saved)
        start = load_config(args.config, base=base) if args.config else base
    else:
        base = start = load_config(args.config) if args.config else TrainConfig()
    flags = {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg_")}
    cfg = apply_overrides(apply_dict(start, flags, source="command line"), args.overrides)
    if not args.resume:  # a resumed run's config already holds what its init gave it
        cfg = inherit_init_fields(cfg, start, flags, args.overrides)
    cfg = cfg.validate()
    if args.resume and not args.allow_config_change:
        recorded = recorded_config(Path(args.out))
        edited = {} if recorded is None else {k: v for k, v in recorded.to_dict().items()
                                               if base.to_dict()[k] != v and k not in RESUME_CHANGEABLE}
        if edited:
            differ = "; ".join(f"{k}: {v!r} in the checkpoint, {base.to_dict()[k]!r} in {saved}"
                               for k, v in edited.items())
            raise ValueError(f"--resume: {saved} was edited since the run's last checkpoint ({differ}); restore it, "
                             f"or pass --allow-config-change to continue with the edited values")
        check_resume_changes(base, cfg, source=f"--resume of {saved}")
    return cfg


def inherit_init_fields(cfg: TrainConfig, start: TrainConfig, flags: dict, overrides: list[str]) -> TrainConfig:
    """A fine-tune of a rectflow model takes its autoencoder and text encoder from the model's training config
    (rectflow.training.finetune.inherit_from_init) where neither the config file nor the command line sets them."""
    defaults = TrainConfig().to_dict()
    named = set(flags) | {parse_override(o)[0].split(".")[0] for o in overrides}
    named |= {k for k, v in start.to_dict().items() if v != defaults[k]}
    cfg, taken = inherit_from_init(cfg, named)
    if taken:
        said = ", ".join(f"{k} {v!r}" for k, v in taken.items())
        print(f"rectflow train: {said} from the init model's training config ({cfg.init})", file=sys.stderr)
    return cfg


def recorded_config(run_dir: Path) -> TrainConfig | None:
    """The config the run's latest loadable checkpoint was written with (None: no checkpoint yet), read from its
    weights' header (rectflow.training.checkpoint.weights_metadata), not from the optimizer state."""
    ck = find_checkpoint(run_dir)
    if ck is None:
        return None
    path = ck / WEIGHT_FILES["raw"]
    recorded = train_config_of(check_safetensors(path).get("__metadata__", {}))
    return None if recorded is None else TrainConfig.from_dict(recorded, source=str(path))


def check_resume_changes(old: TrainConfig, new: TrainConfig, source: str = "--resume") -> None:
    """Refuse config changes that would make a resumed run differ from an uninterrupted one."""
    before, after = old.to_dict(), new.to_dict()
    changed = {k for k, v in after.items() if before[k] != v}
    fixed = changed - RESUME_CHANGEABLE
    if fixed:
        detail = "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(fixed))
        raise ValueError(f"{source}: cannot change {detail} (that would break exact continuation); changeable: "
                         f"{', '.join(sorted(RESUME_CHANGEABLE))}")
    if "max_steps" in changed and old.lr_schedule == "cosine":
        # the cosine decay reaches min_lr at max_steps: another max_steps changes the learning rate of every step
        raise ValueError(f"{source}: cannot change max_steps ({old.max_steps} -> {new.max_steps}) of a run with "
                         f"lr_schedule 'cosine': the learning rate of every step after warm-up depends on it; "
                         f"start a new run (max_steps may change on resume with lr_schedule 'constant')")


def run(args) -> int:
    """Entry point of `rectflow train`."""
    if args.out is None:
        args.out = time.strftime("runs/%Y%m%d-%H%M%S")
    args.resume = args.resume or args.resume_from_last_good
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rectflow train: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"rectflow train: --out {out} is a file; a run needs a directory", file=sys.stderr)
        return 2
    if not args.resume and find_checkpoint(out) is not None:
        print(f"rectflow train: {out} already holds a run; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, out, resume=args.resume, from_last_good=args.resume_from_last_good)
    except (ValueError, OSError) as err:  # the config names something that cannot be built or found
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        print(f"rectflow train: {err}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except TrainingAborted as err:
        print(f"rectflow train: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(trainer.ctx)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"rectflow train: run written to {out}", file=sys.stderr)
    return 0


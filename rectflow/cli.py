"""The `rectflow` command line: one program, one subcommand per module.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `rectflow --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("rectflow.training.cli", "train an MM-DiT with any formulation on built-in data or your images"),
    "sample": ("rectflow.sample", "generate images from prompts with a trained run or a checkpoint"),
    "eval": ("rectflow.evaluate.run", "validation loss, CLIP score, FID and GenEval-style scores of a run"),
    "train-scorer": ("rectflow.evaluate.scorer", "train the small offline CLIP-style scorer on built-in data"),
    "convert": ("rectflow.checkpoints", "convert MM-DiT weights between the released (SD3) and diffusers layouts"),
    "convert-lora": ("rectflow.lora.cli", "convert a LoRA between the rectflow, diffusers, kohya and ComfyUI layouts"),
    "shards": ("rectflow.shards", "pack a folder of images (or built-in data) into WebDataset-style tar shards"),
    "cache": ("rectflow.training.precompute", "precompute a data set's latents and text features into shards"),
    "preferences": ("rectflow.preferences", "preference pairs from a model's samples, judged by the shapes detector"),
    "demo": ("rectflow.demo", "sample the shipped model and train a small one from scratch on built-in data"),
    "ablate": ("rectflow.ablate", "run the paper's studies at small scale and write reports"),
}


DEBUG_ENV = "RECTFLOW_DEBUG"  # set (to anything but 0) for tracebacks, as --debug does
# what a user's mistake raises (a bad file, value or path): reported in one line, exit status 2
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectflow", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=f"print Python tracebacks of errors (or set "
                        f"{DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # command not built yet in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"rectflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the error boundary: one line for the user, the traceback only when asked
        if debug:
            raise
        return report(args.command, err)


def report(command: str, err: Exception) -> int:
    """Print an error as one line naming the command; 2 for bad input, 1 for anything else (a bug or a failure of
    the machine), which also says how to see the traceback."""
    import yaml
    if isinstance(err, USER_ERRORS + (yaml.YAMLError,)):
        print(f"rectflow {command}: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"rectflow {command}: {type(err).__name__}: {_one_line(err)} (rerun with --debug, or {DEBUG_ENV}=1, for "
          f"the traceback)", file=sys.stderr)
    return 1


def _one_line(err: Exception) -> str:
    """An exception's message on one line (OSError: with its file name)."""
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())

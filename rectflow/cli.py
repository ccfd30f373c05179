"""The `rectflow` command line: one program, one subcommand per module.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `rectflow --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("rectflow.training.cli", "train an MM-DiT with any formulation on built-in data or your images"),
    "sample": ("rectflow.sample", "generate images from prompts with a trained run or a checkpoint"),
    "eval": ("rectflow.evaluate.run", "validation loss, CLIP score, FID and GenEval-style scores of a run"),
    "train-scorer": ("rectflow.evaluate.scorer", "train the small offline CLIP-style scorer on built-in data"),
    "convert": ("rectflow.checkpoints", "convert MM-DiT weights between the released (SD3) and diffusers layouts"),
    "demo": ("rectflow.demo", "sample the shipped model and train a small one from scratch on built-in data"),
    "ablate": ("rectflow.ablate", "run the paper's studies at small scale and write reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectflow", description=__doc__.splitlines()[0])
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
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

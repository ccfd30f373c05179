"""The run directory, the one layout every command reads and writes:

    RUN/config.yaml                 the training config (rectflow.config.TrainConfig)
    RUN/metrics.jsonl               one record per training step
    RUN/tb/                         TensorBoard
    RUN/samples/step_N.png          sample grids written during training
    RUN/checkpoints/step_N/         model.safetensors (raw), ema.safetensors, state.pt (optimizer, step, RNG);
                                    a sharded checkpoint has model.dcp/ and ema.dcp/ (torch.distributed.checkpoint
                                    folders, the optimizer state in model.dcp) in place of the two files
    RUN/checkpoints/latest          the name of the newest complete step_N, written last
    RUN/cache/                      latents (and text features) of the run's data, unless cache_dir says otherwise
    RUN/eval/                       `rectflow eval` reports

A checkpoint directory is written under a temp name and renamed into place, the pointer after it: a kill at any
moment leaves the previous checkpoint loadable. This module knows names and files only, no models.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from rectflow.files import (SHARDED_METADATA, DamagedFile, check_safetensors, check_sharded, check_zip, fsync,
                            permit, write_text_atomic)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"
WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}
SHARDED_WEIGHTS = {"ema": "ema.dcp", "raw": "model.dcp"}  # checkpoint_format: sharded
CHECKPOINT_FILES = (WEIGHT_FILES["raw"], WEIGHT_FILES["ema"], STATE)


def step_name(step: int) -> str:
    """The folder name of the checkpoint after `step` optimizer steps."""
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    """RUN/checkpoints."""
    return Path(run_dir) / CHECKPOINTS


class DamagedCheckpoint(ValueError):
    """The newest checkpoint of a run holds all its files but they do not load; the message names it and the newest
    loadable one."""


def is_sharded(ck_dir: Path) -> bool:
    """A checkpoint written as torch.distributed.checkpoint folders (checkpoint_format: sharded)."""
    return all((Path(ck_dir) / d / SHARDED_METADATA).is_file() for d in SHARDED_WEIGHTS.values())


def is_complete(ck_dir: Path) -> bool:
    """A checkpoint directory with all its files (whether they load: checkpoint_problem)."""
    ck_dir = Path(ck_dir)
    if (ck_dir / STATE).is_file() and is_sharded(ck_dir):
        return True
    return all((ck_dir / f).is_file() for f in CHECKPOINT_FILES)


def checkpoint_problem(ck_dir: Path) -> str | None:
    """Why a complete checkpoint directory does not load (a damaged header, a truncated file), or None."""
    ck_dir = Path(ck_dir)
    try:
        if is_sharded(ck_dir):
            for d in SHARDED_WEIGHTS.values():
                check_sharded(ck_dir / d)
        else:
            check_safetensors(ck_dir / WEIGHT_FILES["raw"])
            check_safetensors(ck_dir / WEIGHT_FILES["ema"])
        check_zip(ck_dir / STATE)
    except (DamagedFile, FileNotFoundError) as err:
        return str(err)
    return None


def _step_of(d: Path) -> int:
    return int(d.name[5:])


def step_dirs(ck_root: Path, loadable: bool = True) -> list[Path]:
    """Complete step_N directories (with loadable=True: only those whose files load), oldest first."""
    if not Path(ck_root).is_dir():
        return []
    dirs = [d for d in Path(ck_root).glob("step_*") if d.is_dir() and d.name[5:].isdigit() and is_complete(d)]
    if loadable:
        dirs = [d for d in dirs if checkpoint_problem(d) is None]
    return sorted(dirs, key=_step_of)


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points to if it loads; else the newest loadable step_N; None when there is none."""
    ck_root = checkpoint_root(run_dir)
    pointer = ck_root / LATEST
    if pointer.is_file():
        d = ck_root / pointer.read_text(errors="replace").strip()
        if d.is_dir() and d.parent == ck_root and is_complete(d) and checkpoint_problem(d) is None:
            return d
    dirs = step_dirs(ck_root)
    return dirs[-1] if dirs else None


def damaged_newest(run_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoint, problem) when the newest complete checkpoint of a run does not load, else None. Interrupted saves
    (temp folders, folders missing files) are not damage: rectflow never renames a checkpoint into place unfinished."""
    complete = step_dirs(checkpoint_root(run_dir), loadable=False)
    if not complete:
        return None
    problem = checkpoint_problem(complete[-1])
    return None if problem is None else (complete[-1], problem)


def check_resumable(run_dir: str | Path, from_last_good: bool) -> Path | None:
    """The checkpoint to resume from: find_checkpoint's, unless the newest one is damaged and from_last_good is not
    set, which raises DamagedCheckpoint naming both (nothing is deleted)."""
    found, damaged = find_checkpoint(run_dir), damaged_newest(run_dir)
    if damaged and not from_last_good and (found is None or _step_of(found) < _step_of(damaged[0])):
        last = f"the newest loadable one is {found}" if found else "no loadable checkpoint is left"
        raise DamagedCheckpoint(f"the newest checkpoint {damaged[0]} is damaged ({damaged[1]}); {last}. Pass "
                                f"--resume-from-last-good to continue from {'it' if found else 'scratch'} "
                                f"(the damaged one is kept, renamed when that step is written again)")
    return found


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """checkpoints/step_N written atomically: `write(tmp_dir)` fills a temp folder, which is flushed and renamed into
    place; then `latest` points at it and all but the newest `keep_last` are removed. Returns the folder."""
    tmp = begin_checkpoint(run_dir, step)
    write(tmp)
    return finish_checkpoint(run_dir, step, tmp, keep_last)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The temp folder checkpoint `step` is written into (by one process, or by every rank of a sharded save)."""
    ck_root = checkpoint_root(run_dir)
    ck_root.mkdir(parents=True, exist_ok=True)
    return permit(tempfile.mkdtemp(prefix=f".tmp-{step_name(step)}-", dir=ck_root))


def finish_checkpoint(run_dir: str | Path, step: int, tmp: Path, keep_last: int) -> Path:
    """Flush a filled temp folder, rename it to step_N, point `latest` at it, prune; returns step_N."""
    ck_root, name = checkpoint_root(run_dir), step_name(step)
    for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
        fsync(f)
    fsync(tmp)  # the directory's entries too: after a crash the renamed directory must hold all its files
    final = ck_root / name
    if final.exists():  # left by an earlier attempt at this step (a run resumed from before it)
        if is_complete(final) and checkpoint_problem(final) is not None:  # damaged: kept for the user to inspect
            os.replace(final, ck_root / f"{name}.damaged-{os.getpid()}-{len(list(ck_root.iterdir()))}")
        else:
            os.replace(final, tempfile.mkdtemp(prefix=f".trash-{name}-", dir=ck_root))
    os.replace(tmp, final)
    fsync(ck_root)  # the rename itself
    # the pointer is written last: until it changes, loading uses the previous checkpoint
    write_text_atomic(ck_root / LATEST, name + "\n")
    fsync(ck_root)
    prune(ck_root, keep_last, keep=name)
    return final


def prune(ck_root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (rename first, so a kill leaves no half-deleted step_N)."""
    old = [d for d in step_dirs(ck_root)[:-keep_last] if d.name != keep]
    for d in old:
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{d.name}-", dir=ck_root))
        os.replace(d, trash / d.name)
    clean_temp(ck_root)


def clean_temp(ck_root: Path) -> None:
    """Remove temp and trash directories left by an interrupted save or prune."""
    for d in Path(ck_root).glob(".t*-*"):
        if d.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def resolve_weights(run: str | None = None, checkpoint: str | None = None, weights: str | None = None) -> Path:
    """The file to load: `weights` ('ema' or 'raw') of a run's latest checkpoint or of a checkpoint directory, or a
    weights file. weights=None: a run's EMA; a directory's ema.safetensors, else its model.safetensors, else the
    directory itself when it is a diffusers folder. Explicitly requested weights that are absent are an error."""
    if weights is not None and weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    if run is not None:
        ck = find_checkpoint(run)
        if ck is None:
            raise FileNotFoundError(f"run {run} has no complete checkpoint (checkpoints/latest or step_N missing)")
        return _weights_in_folder(ck, weights or "ema")
    if checkpoint is None:
        raise ValueError("give --run DIR or --checkpoint FILE")
    path = Path(checkpoint)
    if path.is_dir():
        return _weights_in_folder(path, weights)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if weights is not None:
        raise ValueError(f"--weights {weights} picks a file of a run or checkpoint directory; {path} is a single "
                         f"weights file (pass the file you want, e.g. ema.safetensors, or its directory)")
    return path


def _weights_in_folder(path: Path, weights: str | None) -> Path:
    """The weights file of a checkpoint directory (or the directory itself when it is a diffusers folder)."""
    if is_sharded(path):
        return path / SHARDED_WEIGHTS[weights or "ema"]
    if weights is not None:
        if not (path / WEIGHT_FILES[weights]).is_file():
            held = sorted(p.name for p in path.glob("*.safetensors")) or "no .safetensors file"
            raise FileNotFoundError(f"{path} has no {WEIGHT_FILES[weights]} (the {weights} weights asked for with "
                                    f"--weights {weights}); it holds {held}")
        return path / WEIGHT_FILES[weights]
    found = next((path / n for n in ("ema.safetensors", "model.safetensors") if (path / n).is_file()), None)
    if found is None and (path / "config.json").is_file():
        return path  # a diffusers folder
    if found is None:
        raise FileNotFoundError(f"{path} holds neither ema.safetensors nor model.safetensors nor a diffusers "
                                f"config.json")
    return found


def latest_checkpoint(run: str | Path) -> Path:
    """The run's latest complete checkpoint directory, or FileNotFoundError saying so."""
    ck = find_checkpoint(run)
    if ck is None:
        raise FileNotFoundError(f"run {run} has no complete checkpoint (checkpoints/latest or step_N missing)")
    return ck

"""Run the paper's studies at small scale and write their reports: `rectflow ablate formulations --budget 0.1`.

Studies (rectflow.studies; sections of docs/paper.md): formulations (§3, Table 1), architectures (§4), channels (§4,
autoencoder latent channels), shift (§5), steps (§6, Table 6). Each is a grid of runs with the same model, data,
budget and seed except for what the study varies, trained through rectflow.training and scored through
rectflow.evaluate.

Runs live in RUNS/STUDY/budget-B/RUN/: spec.json (what defines the run), the trainer's files (config.yaml,
metrics.jsonl, checkpoints/), eval/ (one JSON per evaluation setting) and result.json, written last. A run with
result.json is finished and never redone; any other resumes (training from its latest checkpoint, evaluation at the
settings not yet written). A lock per run lets several processes share a study; --worker i/n restricts a process
to runs i, i+n, ... Whichever process finds every run finished writes the report, OUT/STUDY.md with its figures in
OUT/STUDY/ and every run's result in OUT/STUDY/results.json and results.csv (or run `--report-only` later).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

from rectflow.devices import native_bf16
from rectflow.files import read_json, write_json, write_text_atomic
from rectflow.studies import STUDIES
from rectflow.studies.common import Run, StudyOptions, folder_name
from rectflow.studies.evaluation import normalize_result

POLL_SECONDS = 10.0  # how often a process waiting for another's run checks again


# ---------------------------------------------------------------- locks


class RunLock:
    """An exclusive, non-blocking lock on a run folder (released when the process ends, however it ends)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def acquire(self) -> bool:
        """Take the lock if no other process holds it."""
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self.fh = fh
        return True

    def release(self) -> None:
        """Give the lock back."""
        if self.fh is not None:
            self.fh.close()  # closing the descriptor drops the flock
            self.fh = None


# ---------------------------------------------------------------- the grid


def parse_worker(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--worker {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--worker {text!r}: need 0 <= i < n")
    return i, n


def select(runs: list[Run], variants: list[str] | None) -> list[Run]:
    """The runs named in --variants (all when None), in the study's order; a name also picks the runs of that
    variant in studies with several seeds of each (spec "variant"); unknown names are an error."""
    if not variants:
        return runs
    names = [r.name for r in runs]
    groups = {r.spec.get("variant") for r in runs if isinstance(r.spec, dict)} - {None}
    unknown = [v for v in variants if v not in names and v not in groups]
    if unknown:
        raise ValueError(f"--variants: unknown run(s) {unknown}; this study's runs are {names}")
    wanted = set(variants) | {r.name for r in runs if isinstance(r.spec, dict) and r.spec.get("variant") in variants}
    return [r for r in runs if r.name in wanted or any(r.name in n.needs for n in runs if n.name in wanted)]


class Grid:
    """A study's runs on disk: which are finished, and doing (or waiting for) the others."""

    def __init__(self, module, opts: StudyOptions, runs: list[Run]):
        self.module, self.opts, self.runs = module, opts, runs
        self.by_name = {r.name: r for r in runs}
        self.root = opts.study_dir
        self.trained: list[str] = []  # runs this process executed
        self.archive = archived_results(opts)
        self.machine = _device_words(opts)  # what a result made here records, and an archived one must match
        folders = [folder_name(r.name) for r in runs]
        if len(set(folders)) != len(folders):
            raise ValueError(f"study {opts.study}: run names {[r.name for r in runs]} do not map to distinct folders")

    def dir(self, run: Run) -> Path:
        """The run's folder."""
        return self.root / folder_name(run.name)

    def result(self, run: Run) -> dict | None:
        """The finished run's result (scores in the shared metric keys, also for runs made before them), or None."""
        if self.dir(run).exists():  # a folder of this session's (finished, or to resume): its own state decides
            return normalize_result(read_json(self.dir(run) / "result.json"))
        kept = self.archive.get(run.name)
        if kept and kept.get("spec") == run.spec and kept.get("machine") == self.machine:
            return normalize_result(kept)
        return None

    def _check_spec(self, run: Run) -> None:
        """A folder may only be resumed by the same run: compare spec.json (write it the first time)."""
        path = self.dir(run) / "spec.json"
        saved = read_json(path)
        if saved is None:
            write_json(path, run.spec)
            return
        if saved != run.spec:
            changed = sorted(k for k in set(saved) | set(run.spec) if saved.get(k) != run.spec.get(k))
            raise ValueError(f"{path} describes a different run ({', '.join(changed)} differ): this folder was made "
                             f"with other options; use another --runs folder or delete {self.dir(run)}")

    def attempt(self, run: Run) -> bool:
        """Do the run unless it is finished or another process holds it; True once it is finished."""
        if self.result(run) is not None:
            return True
        lock = RunLock(self.dir(run))
        if not lock.acquire():
            return False
        try:
            if self.result(run) is not None:  # finished by another process while we looked
                return True
            self._check_spec(run)
            for dep in run.needs:
                self.wait_for(self.by_name[dep])
            print(f"rectflow ablate: {self.opts.study}/{run.name}", file=sys.stderr)
            t0 = time.perf_counter()
            result = self.module.execute(run, self.dir(run), self.opts)
            write_json(self.dir(run) / "result.json", {**result, "wall_seconds": time.perf_counter() - t0,
                                                       "machine": self.machine, "spec": run.spec})
            self.trained.append(run.name)
            return True
        finally:
            lock.release()

    def wait_for(self, run: Run) -> None:
        """Do a needed run, or wait until the process holding it finishes it."""
        while not self.attempt(run):
            time.sleep(POLL_SECONDS)

    def work(self, worker: tuple[int, int]) -> None:
        """Do this worker's share, skipping runs other processes hold."""
        i, n = worker
        for k, run in enumerate(self.runs):
            if k % n == i:
                self.attempt(run)

    def results(self) -> dict[str, dict]:
        """name -> result of every finished run."""
        return {r.name: res for r in self.runs if (res := self.result(r)) is not None}


def archived_results(opts: StudyOptions) -> dict[str, dict]:
    """The runs kept in the study's earlier report (OUT/STUDY/results.json, committed with the report): a run found
    there with its spec and this machine's description counts as finished when the runs folder has no folder of it,
    so a study of more runs than one session can train (on a 2-core machine: seeds of 30-odd runs) grows across
    sessions on the same kind of machine; results made elsewhere or with other options are done again."""
    data = read_json(Path(opts.out) / opts.study / "results.json") or {}
    return {name: res for name, res in (data.get("runs") or {}).items() if isinstance(res, dict) and "spec" in res}


def reproduce_command(opts: StudyOptions) -> str:
    """The command line that reproduces a report (only the options that change results)."""
    parts = ["rectflow", "ablate", opts.study, "--budget", f"{opts.budget:g}"]
    defaults = StudyOptions(study=opts.study)
    for flag, name in [("--data", "data"), ("--text-encoder", "text_encoder"), ("--encoder", "encoder"),
                       ("--grid", "grid"), ("--samples", "samples"), ("--seed", "seed")]:
        if getattr(opts, name) != getattr(defaults, name):
            parts += [flag, str(getattr(opts, name))]
    if opts.variants:
        parts += ["--variants", *opts.variants]
    for o in opts.overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def write_report(module, opts: StudyOptions, grid: Grid) -> Path:
    """OUT/STUDY.md: header (budget, command, runs and their cost), the study's own body, figures in OUT/STUDY/."""
    results = grid.results()
    missing = [r.name for r in grid.runs if r.name not in results]
    fig_dir = Path(opts.out) / opts.study
    body = module.report(results, opts, fig_dir)
    command = reproduce_command(opts)
    hours = sum(r.get("wall_seconds", 0.0) for r in results.values()) / 3600
    machines = ", ".join(sorted({r.get("machine", "?") for r in results.values()})) or "nothing yet"
    lines = [f"# {module.TITLE}", "",
             f"Budget {opts.budget:g}: {hours:.2f} h of run time (the last attempt of each run) on {machines}; data "
             f"`{opts.data}`, text encoder `{opts.text_encoder}`, scored with `{opts.encoder}`. Reproduce with:", "",
             f"    {command}", ""]
    if missing:
        lines += [f"**Partial report**: {len(missing)} of {len(grid.runs)} runs unfinished ({', '.join(missing)}).", ""]
    path = Path(opts.out) / f"{opts.study}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(fig_dir / "results.json", {"study": opts.study, "budget": opts.budget,
                                          "command": command, "missing": missing, "runs": results})
    write_csv(fig_dir / "results.csv", results)
    write_text_atomic(path, "\n".join(lines) + "\n" + body.strip() + "\n" + kept_notes(path, command))
    return path


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys: {"scores": {"s": {"fid": 1}}} -> {"scores.s.fid": 1}."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def write_csv(path: Path, results: dict[str, dict]) -> None:
    """One row per finished run, one column per (dotted) result field; lists are written as JSON."""
    import csv
    import io
    import json
    rows = {name: flatten(res) for name, res in results.items()}
    columns = sorted({k for row in rows.values() for k in row})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *columns])
    for name, row in rows.items():
        writer.writerow([name, *(json.dumps(v) if isinstance(v, list) else ("" if v is None else v)
                                 for v in (row.get(c) for c in columns))])
    write_text_atomic(path, buf.getvalue())


NOTES = "## Notes on this run"


def kept_notes(path: Path, command: str) -> str:
    """The hand-written notes section of an earlier report of the same command (rewriting a report keeps them; a
    report of other runs drops them: they describe different runs)."""
    if not path.is_file():
        return ""
    old = path.read_text()
    if NOTES not in old or f"    {command}\n" not in old:
        return ""
    return "\n" + NOTES + old.split(NOTES, 1)[1].rstrip() + "\n"


def _device_words(opts: StudyOptions) -> str:
    """The evaluation device in words."""
    import torch
    dev = opts.torch_device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    bf16 = "native bf16" if native_bf16(dev) else "bf16 emulated: fp32 training"
    return f"CPU {cpu_model()} ({n} thread{'' if n == 1 else 's'}, {bf16})"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else '?': CPU minutes differ
    several-fold between machines, so a study's numbers name theirs."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_study(opts: StudyOptions, worker: tuple[int, int] = (0, 1), report_only: bool = False) -> dict:
    """Do (this worker's share of) a study and write its report when every run is finished.

    Returns {"trained": runs executed by this call, "finished": all finished runs, "report": path or None}.
    """
    if opts.study not in STUDIES:
        raise ValueError(f"unknown study {opts.study!r}; expected one of {list(STUDIES)}")
    module = importlib.import_module(STUDIES[opts.study])
    grid = Grid(module, opts, select(module.runs(opts), opts.variants))
    if not report_only:
        grid.work(worker)
    finished = grid.results()
    report = None
    if report_only or len(finished) == len(grid.runs):
        report = write_report(module, opts, grid)
    return {"trained": grid.trained, "finished": sorted(finished), "report": report}


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow ablate` options."""
    parser.add_argument("study", choices=list(STUDIES), help="which study to run")
    parser.add_argument("--budget", type=float, default=1.0, help="multiplies training steps and evaluation samples "
                        "(1: about 2 hours per study on 2 CPU cores; 0.1 for a smoke run; more on a GPU)")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these grid points (names as in the "
                        "report, e.g. 'rf' 'rf/lognorm(0.00, 1.00)' for formulations, dit uvit for architectures)")
    parser.add_argument("--grid", choices=("table1", "paper"), default="table1", help="formulations: the 16 "
                        "variants of Table 1, or all 61 of the paper's study")
    parser.add_argument("--data", default="shapes", help="training and evaluation data: shapes (also gives "
                        "GenEval-style scores), emoji, or a folder of captioned images")
    parser.add_argument("--text-encoder", default="minilm", help="text encoder spec of every run")
    parser.add_argument("--encoder", default="scorer", help="image-text encoder of CLIP score and FID: 'scorer' "
                        "(the shipped offline scorer), 'scorer:FILE' or 'clip:DIR' (a transformers CLIP folder)")
    parser.add_argument("--samples", type=int, default=None, help="evaluation images per setting (default "
                        "96 x budget, at least 12)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config field in every run (e.g. depth=2); not the studied one")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--runs", default="runs/ablate", help="where the runs are kept")
    parser.add_argument("--out", default="docs/results", help="where the report (STUDY.md, STUDY/ figures) goes")
    parser.add_argument("--worker", default="0/1", help="i/n: do only runs i, i+n, i+2n, ... (start n processes "
                        "with i = 0..n-1; locks also keep plain parallel processes apart)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of this process (e.g. 1 per process "
                        "when several workers share a machine's cores); default: torch's")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs now "
                        "(a partial report lists the missing ones)")


def options_from_args(args) -> StudyOptions:
    """StudyOptions from parsed arguments."""
    if not args.budget > 0:
        raise ValueError(f"--budget must be > 0, got {args.budget}")
    return StudyOptions(study=args.study, budget=args.budget, data=args.data, text_encoder=args.text_encoder,
                        encoder=args.encoder, variants=args.variants, grid=args.grid, samples=args.samples,
                        overrides=list(args.overrides), seed=args.seed, device=args.device,
                        runs_dir=Path(args.runs), out=Path(args.out))


def run(args) -> int:
    """Entry point of `rectflow ablate`."""
    if args.threads is not None:
        import torch
        torch.set_num_threads(max(1, args.threads))  # a command-line choice for this process only
    try:
        opts = options_from_args(args)
        summary = run_study(opts, parse_worker(args.worker), report_only=args.report_only)
    except (ValueError, FileNotFoundError) as err:
        print(f"rectflow ablate: {err}", file=sys.stderr)
        return 2
    if summary["report"] is not None:
        print(Path(summary["report"]).read_text())
        print(f"rectflow ablate: report written to {summary['report']}", file=sys.stderr)
    else:
        print(f"rectflow ablate: {len(summary['finished'])} runs finished; the report is written by the process "
              f"that finishes the last run (or run again with --report-only)", file=sys.stderr)
    return 0

"""A careless or hostile user's inputs through every subcommand: broken images and captions, damaged and hostile
checkpoint files, bad configs and flag values. Each case checks the exit status (2: bad input), that stderr names
the problem, that no traceback or internal error is printed, and that nothing written before was damaged."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectflow.cli import main

TINY = ["--resolution", "16", "--patch-size", "4", "--depth", "1", "--hidden", "64", "--heads", "2",
        "--batch-size", "4", "--warmup-steps", "1", "--lr-schedule", "constant", "--log-every", "1",
        "--sample-every", "0",
        ]
SHAPES = ["--set", "data_options.categories=[single_object]"]
MARKER = "rectflow-pickle-ran"


class Payload:
    """A pickle that creates a marker file when unpickled (what a hostile checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `rectflow ARGV` run in this process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_clean(rc: int, err: str, *names: str, status: int = 2) -> None:
    """Exit status, the problem named, no traceback and no 'internal error' (an unexpected exception)."""
    assert rc == status, err
    assert "Traceback" not in err and "rerun with --debug" not in err, err
    for name in names:
        assert name in err, (name, err)


def digest(folder: Path) -> dict[str, str]:
    """A hash of every file under a folder (to show nothing was changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tb" not in p.parts and p.name != "metrics.jsonl"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", *TINY, *SHAPES, "--max-steps", "2", "--checkpoint-every", "1", "--keep-last", "3",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture
def weights(run_dir) -> Path:
    return run_dir / "checkpoints" / "step_00000002" / "ema.safetensors"


# ---------------------------------------------------------------- damaged and hostile checkpoint files

def _damaged_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what stderr must say)."""
    raw = good.read_bytes()
    files = {}

    def put(name, data, expect, suffix=".safetensors"):
        path = tmp / f"{name}{suffix}"
        path.write_bytes(data)
        files[name] = (path, expect)

    put("truncated", raw[: len(raw) // 2], "truncated")
    put("empty", b"", "empty")
    put("random", np.random.default_rng(0).bytes(4096), "not a readable safetensors file")
    put("pickle-renamed", pickle.dumps({"a": 1}), "pickle")
    buf = tmp / "img.png"
    Image.new("RGB", (8, 8)).save(buf)
    put("image", buf.read_bytes(), "PNG image")
    put("trailing", raw + b"\0" * 16, "trailing data")
    n = int.from_bytes(raw[:8], "little")
    put("bad-header", raw[:8] + b"{" * n + raw[8 + n:], "header is not valid JSON")
    put("hostile-pt", pickle.dumps(Payload(tmp / MARKER)), "pickle", suffix=".pt")
    put("hostile-PT", pickle.dumps(Payload(tmp / MARKER)), "pickle", suffix=".PT")
    from safetensors.torch import save_file
    save_file({"not_a_model": torch.zeros(3)}, str(tmp / "wrong-keys.safetensors"))
    files["wrong-keys"] = (tmp / "wrong-keys.safetensors", "wrong-keys.safetensors")
    return files


def test_damaged_and_hostile_checkpoints_in_sample_and_convert(tmp_path, capsys, weights):
    files = _damaged_files(tmp_path, weights)
    assert len(files) >= 10
    for name, (path, expect) in files.items():
        rc, err = cli(capsys, "sample", "--checkpoint", path, "--prompt", "a red circle", "--out", tmp_path / "s.png")
        assert_clean(rc, err, str(path), expect)
        rc, err = cli(capsys, "convert", path, tmp_path / "out.safetensors")
        assert_clean(rc, err, str(path), expect)
    # with --allow-pickle the hostile pickles are still read with weights_only: refused, their code never runs
    rc, err = cli(capsys, "convert", files["hostile-pt"][0], tmp_path / "out.safetensors", "--allow-pickle")
    assert rc == 2 and "Traceback" not in err
    assert not (tmp_path / MARKER).exists()
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_the_last_good_one_offered(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    newest = run / "checkpoints" / "step_00000002"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) - 100])  # an interrupted copy, a full disk
    before = digest(run / "checkpoints")
    rc, err = cli(capsys, "train", "--out", run, "--resume", "--max-steps", "3")
    assert_clean(rc, err, "step_00000002", "damaged", "step_00000001", "--resume-from-last-good")
    assert digest(run / "checkpoints") == before
    # sampling and evaluation use the newest loadable checkpoint
    rc, err = cli(capsys, "sample", "--run", run, "--prompt", "a red circle", "--steps", "2", "--out",
                  tmp_path / "s.png")
    assert rc == 0, err
    rc, err = cli(capsys, "eval", "--run", run, "--samples", "2", "--settings", "2x1.0", "--weights", "ema",
                  "--val-samples", "4", "--ref-samples", "4", "--out", tmp_path / "eval.json")
    assert rc == 0, err
    assert "step_00000001" in json.loads((tmp_path / "eval.json").read_text())["settings"]["checkpoints"]["ema"]
    rc, err = cli(capsys, "train", "--out", run, "--resume-from-last-good", "--max-steps", "3")
    assert rc == 0, err
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names[0] == "step_00000001" and any(n.startswith("step_00000002.damaged") for n in names)
    assert "step_00000003" in names  # continued from step 1, the damaged step 2 kept aside


def test_a_damaged_state_file_is_named(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step_00000002" / "state.pt").write_bytes(b"garbage")
    rc, err = cli(capsys, "train", "--out", run, "--resume", "--max-steps", "3")
    assert_clean(rc, err, "state.pt", "step_00000001")


# ---------------------------------------------------------------- broken images and captions

def test_broken_images_and_captions_are_counted_not_fatal(tmp_path, capsys, caplog):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(d / f"ok{i}.png")
    Image.new("CMYK", (16, 16)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(d / "deep.png")
    Image.new("RGBA", (16, 16)).save(d / "alpha.png")
    Image.new("P", (16, 16)).save(d / "pal.png")
    Image.new("L", (1, 1)).save(d / "tiny.png")
    Image.new("RGB", (16, 16)).save(d / "disguised.jpg", format="PNG")
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    raw = (tmp_path / "f.png").read_bytes()
    (d / "cut.png").write_bytes(raw[: len(raw) // 2])
    (d / "dir.png").mkdir()
    (d / "ok1.txt").write_bytes(b"\xff\xfe bad utf-8 caption")
    lines = [{"file_name": "ok0.png", "text": None}, {"file_name": "ok2.png", "text": 5},
             {"file_name": "ok3.png", "text": ["a", "b"]}, {"text": "no file name"},
             {"file_name": "missing.png", "text": "gone"}, {"file_name": "cmyk.jpg", "text": "a cmyk image"}]
    (d / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, lines)).encode()
                                       + b"\n{not json\n[1, 2]\n")
    with caplog.at_level("INFO", logger="rectflow.data.folder"):
        rc, err = cli(capsys, "train", *TINY, "--data", d, "--max-steps", "1", "--out", tmp_path / "r")
    assert rc == 0, err
    log = caplog.text
    for reason in ("caption 'text' is NoneType, not a string", "caption 'text' is int", "caption 'text' is list",
                   "expected a JSON object with a file_name", "names a missing image file", "not valid JSON",
                   "skipped: empty file", "skipped: not an image", "skipped: truncated or corrupt",
                   "converted: cmyk", "converted: 16-bit", "converted: alpha", "converted: palette",
                   "converted: wrong extension"):
        assert reason in log, reason
    assert "metadata.jsonl:1: skipped" in log and "metadata.jsonl:3: skipped" in log  # line numbers
    assert "a cmyk image" not in log  # the BOM-prefixed file's good line was read as usual


# ---------------------------------------------------------------- bad configs and flag values

BAD_TRAIN_FLAGS = [
    (["--lr", "inf"], "'lr'"), (["--lr", "nan"], "'lr'"), (["--lr", "-1"], "'lr'"),
    (["--batch-size", "0"], "'batch_size'"), (["--shift", "0"], "'shift'"), (["--resolution", "0"], "'resolution'"),
    (["--device", "gpu"], "gpu"), (["--device", "cuda:7"], "cuda"), (["--set", "nosuchkey=1"], "nosuchkey"),
    (["--set", "lr=[1"], "lr"), (["--ema-decay", "1.5"], "'ema_decay'"), (["--formulation", "rf/what"], "rf/what"),
    (["--set", "text_drop=2"], "'text_drop'"), (["--data", "/no/such/folder"], "/no/such/folder"),
]


@pytest.mark.parametrize("flags,named", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_values_are_refused_up_front(tmp_path, capsys, flags, named):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    rc, err = cli(capsys, "train", *TINY, *SHAPES, *flags, "--max-steps", "1", "--out", tmp_path / "r")
    assert_clean(rc, err, named)
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


def test_bad_config_files(tmp_path, capsys):
    cases = {"syntax.yaml": ("lr: [1,\n", "not valid YAML"), "type.yaml": ("lr: fast\n", "'lr'"),
             "list.yaml": ("- 1\n- 2\n", "expected a mapping"), "latin1.yaml": (b"data: caf\xe9\n", "not UTF-8")}
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        rc, err = cli(capsys, "train", "--config", path, "--out", tmp_path / "r")
        assert_clean(rc, err, name, expect)
    rc, err = cli(capsys, "train", "--config", tmp_path, "--out", tmp_path / "r")
    assert_clean(rc, err, "is a directory")
    (tmp_path / "afile").write_text("x")
    rc, err = cli(capsys, "train", *TINY, "--out", tmp_path / "afile")
    assert_clean(rc, err, "afile", "is a file")


def test_hand_edited_config_is_refused_on_resume(tmp_path, capsys, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = digest(run / "checkpoints")
    text = (run / "config.yaml").read_text()
    for key, old, new in (("lr", "lr: 0.001", "lr: 0.5"), ("depth", "depth: 1", "depth: 3")):
        (run / "config.yaml").write_text(text.replace(old, new))
        rc, err = cli(capsys, "train", "--out", run, "--resume", "--max-steps", "3")
        assert_clean(rc, err, key, "edited", "--allow-config-change")
    assert digest(run / "checkpoints") == before


BAD_SAMPLE_FLAGS = [(["--cfg-scale", "nan"], "--cfg-scale"), (["--cfg-scale", "-1"], "--cfg-scale"),
                    (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                    (["--shift", "inf"], "--shift"), (["--device", "cuda"], "cuda"), (["--weights", "raw"], "raw")]


@pytest.mark.parametrize("flags,named", BAD_SAMPLE_FLAGS, ids=[" ".join(f) for f, _ in BAD_SAMPLE_FLAGS])
def test_bad_sample_values(tmp_path, capsys, weights, flags, named):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, err = cli(capsys, "sample", "--checkpoint", weights, "--prompt", "a red circle", *flags,
                  "--out", tmp_path / "s.png")
    assert_clean(rc, err, named)
    assert not (tmp_path / "s.png").exists()


def test_bad_prompt_files_and_outputs(tmp_path, capsys, weights):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    cases = [(["--prompts-file", tmp_path / "latin1.txt"], "latin1.txt"),
             (["--prompts-file", tmp_path], "is a directory"),
             (["--prompts-file", tmp_path / "none.txt"], "does not exist"),
             (["--prompt", "x", "--out", tmp_path], "is a directory")]
    for flags, named in cases:
        rc, err = cli(capsys, "sample", "--checkpoint", weights, *flags, *(["--out", tmp_path / "s.png"]
                                                                            if "--out" not in flags else []))
        assert_clean(rc, err, named)


def test_bad_eval_and_ablate_values(tmp_path, capsys, run_dir):
    rc, err = cli(capsys, "eval", "--run", tmp_path / "nothing")
    assert_clean(rc, err, "nothing")
    rc, err = cli(capsys, "eval", "--run", run_dir, "--samples", "1")
    assert_clean(rc, err, "--samples")
    rc, err = cli(capsys, "eval", "--run", run_dir, "--settings", "fifty")
    assert_clean(rc, err, "fifty")
    rc, err = cli(capsys, "ablate", "formulations", "--worker", "3/2", "--runs", tmp_path / "a")
    assert_clean(rc, err, "--worker")
    rc, err = cli(capsys, "ablate", "formulations", "--budget", "nan", "--runs", tmp_path / "a")
    assert_clean(rc, err, "--budget")

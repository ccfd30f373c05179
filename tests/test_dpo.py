"""Diffusion-DPO (rectflow.training.dpo): the loss by hand, log 2 at the reference with a gradient that lowers the
preferred image's error, the preference readers, `rectflow preferences`, and a DPO run resuming bit-exactly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rectflow.data import get_dataset
from rectflow.data.preferences import PreferencePairs
from rectflow.training.dpo import dpo_loss
from tests.test_train import losses

ROOT = Path(__file__).resolve().parents[1]


def test_dpo_loss_by_hand():
    pw, pl, rw, rl = (torch.tensor(v) for v in ([0.5, 1.0], [0.7, 0.2], [0.6, 0.9], [0.6, 0.4]))
    loss, margin = dpo_loss(pw, pl, rw, rl, beta=2.0)
    # margin = -((pw - rw) - (pl - rl)) = -((-0.1) - (0.1)) = 0.2 and -((0.1) - (-0.2)) = -0.3
    torch.testing.assert_close(margin, torch.tensor([0.2, -0.3]))
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-0.4)), math.log(1 + math.exp(0.6))]))


def test_at_the_reference_the_loss_is_log_2_and_lowers_the_preferred_error():
    err_w, err_l = torch.tensor([0.8, 0.3], requires_grad=True), torch.tensor([0.5, 0.9], requires_grad=True)
    loss, _ = dpo_loss(err_w, err_l, err_w.detach(), err_l.detach(), beta=100.0)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    loss.sum().backward()
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()  # descent lowers e(x_w), raises e(x_l)


def _image(path: Path, colour) -> str:
    Image.new("RGB", (20, 20), colour).save(path)
    return path.name


def test_preference_readers_take_both_layouts_and_count_bad_rows(tmp_path):
    rows = [{"prompt": "a red circle", "chosen": _image(tmp_path / "a.png", "red"),
             "rejected": _image(tmp_path / "b.png", "blue")},
            {"caption": "two squares", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0},
            {"caption": "a tie", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.5},
            {"prompt": "gone", "chosen": "missing.png", "rejected": "b.png"},
            {"prompt": "same", "chosen": "a.png", "rejected": "a.png"}]
    (tmp_path / "preferences.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    ds = get_dataset(str(tmp_path), 16)
    assert isinstance(ds, PreferencePairs) and ds.n_pairs == 2 and len(ds) == 4
    assert sum(ds.counts.values()) == 4
    assert ds[0]["caption"] == "a red circle" and ds[0]["image"][0].mean() > 0.9  # red preferred
    assert ds[2]["caption"] == "two squares" and ds[2]["image"][2].mean() > 0.9  # label_0 = 0: jpg_1 (blue) won
    assert ds[3]["meta"]["preferred"] is False
    with pytest.raises(FileNotFoundError, match="no validation split"):
        get_dataset(str(tmp_path), 16, split="val")


def _preferences(out: Path) -> Path:
    from rectflow.cli import main
    assert main(["preferences", "--checkpoint", str(ROOT / "rectflow" / "assets" / "default_model"), "--prompts", "12",
                 "--per-prompt", "4", "--steps", "6", "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # samples 48 images from the shipped model, then three DPO runs as subprocesses, one killed
def test_self_generated_pairs_and_a_dpo_run_that_resumes_after_sigkill(tmp_path):
    """`rectflow preferences` pairs correct with incorrect samples of the shipped model (on prompts apart from rectflow
    eval's); a DPO LoRA run on them starts at loss log 2 and, killed after a checkpoint and resumed, logs exactly the
    losses of an uninterrupted run."""
    from rectflow.evaluate.protocol import eval_set
    from tests.test_train import kill_after_checkpoint
    prefs = _preferences(tmp_path / "prefs")
    rows = [json.loads(line) for line in (prefs / "preferences.jsonl").read_text().splitlines()]
    summary = json.loads((prefs / "summary.json").read_text())
    assert rows and summary["pairs"] == len(rows)
    assert not {r["prompt"] for r in rows} & set(eval_set("shapes", 32, 120, 0, {})[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(run, resume=False):
        return [sys.executable, "-m", "rectflow.cli", "train", "--init", str(ROOT / "rectflow" / "assets" /
                "default_model"), "--data", str(prefs), "--out", str(run), "--lora", "4", "--set", "objective=dpo",
                "--batch-size", "4", "--max-steps", "12", "--checkpoint-every", "3", "--sample-every", "0",
                "--warmup-steps", "0", "--lr", "1e-3", "--log-every", "1"] + (["--resume"] if resume else [])
    ref, run = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cmd(ref), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=600)
    assert losses(ref)[0] == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts at zero: policy = reference
    kill_after_checkpoint(cmd(run), run, env, step=6)
    assert len(losses(run)) < 12
    subprocess.run(cmd(run, resume=True), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    assert losses(run) == losses(ref)
    recs = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["dpo_accuracy"] <= 1.0 for r in recs)


def test_dpo_needs_a_lora_and_pairs(tmp_path, capsys):
    from rectflow.cli import main
    assert main(["train", "--set", "objective=dpo", "--out", str(tmp_path / "r"), "--max-steps", "1"]) == 2
    assert "dpo trains a LoRA" in capsys.readouterr().err

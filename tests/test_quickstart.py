"""The README quick start, through the CLI's main function (tiny model flags added, as the README allows)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from rectflow.cli import main
from rectflow.train import find_checkpoint, load_state

TINY = ["--resolution", "16", "--patch-size", "4", "--depth", "1", "--hidden", "64", "--heads", "2",
        "--batch-size", "8", "--sample-every", "10", "--sample-steps", "3",
        "--set", "data_options.categories=[single_object]"]  # 18 distinct captions to encode


@pytest.mark.slow
def test_quickstart(tmp_path):
    run, grid = tmp_path / "first", tmp_path / "red.png"
    assert main(["train", "--data", "shapes", "--max-steps", "20", "--out", str(run), *TINY]) == 0
    assert load_state(find_checkpoint(run))["step"] == 20
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 20
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--out", str(grid)]) == 0
    img = Image.open(grid)
    assert json.loads(img.text["prompts"]) == ["a red circle"]
    assert (tmp_path / "red_000.png").is_file()
    # a second train into the same directory must not silently restart it
    assert main(["train", "--data", "shapes", "--max-steps", "20", "--out", str(run), *TINY]) == 2
    # --resume continues a run exactly: a larger --max-steps would change its cosine schedule, so it is refused
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "22", "--seed", "0"]) == 2
    assert main(["train", "--out", str(run), "--resume", "--seed", "0", "--log-every", "5"]) == 0
    assert load_state(find_checkpoint(run))["step"] == 20
    assert main(["train", "--out", str(run), "--resume", "--seed", "1"]) == 2  # changing the seed would break it


@pytest.mark.slow  # the demo recipe at full size: 25-step grids of the shipped model and of the run
def test_demo_smoke(tmp_path, capsys):
    """`rectflow demo` with a 2-step budget: both grids (or the note that the shipped model is absent) and the run."""
    from rectflow.demo import DEFAULT_MODEL
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert (out / "scratch_model.png").is_file() and (out / "scratch_model_000.png").is_file()
    assert load_state(find_checkpoint(out / "run"))["step"] == 2
    if any(DEFAULT_MODEL.glob("*.safetensors")):
        assert (out / "default_model.png").is_file()
    else:
        assert "default model is not in this installation" in err


def test_demo_budget_calibration(tmp_path):
    from rectflow.config import TrainConfig
    from rectflow.demo import steps_for_budget
    cfg = TrainConfig.from_dict({"resolution": 16, "patch_size": 4, "depth": 1, "hidden": 64, "heads": 2,
                                 "batch_size": 8, "data_options": {"categories": ["single_object"]}})
    steps, img_s = steps_for_budget(cfg, tmp_path / "probe", minutes=0.5, probe_steps=2)
    assert img_s > 0 and steps == int(0.5 * 60 * 0.92 / (cfg.batch_size / img_s))
    assert not (tmp_path / "probe").exists()  # probing writes nothing


def test_demo_samples_a_shipped_model(tmp_path, monkeypatch):
    """With weights in the default-model folder (a run's ema.safetensors), the demo samples them."""
    import shutil

    import rectflow.demo as demo
    run = tmp_path / "run"
    assert main(["train", "--max-steps", "2", "--out", str(run), *TINY]) == 0
    shipped = tmp_path / "default_model"
    shipped.mkdir()
    shutil.copy(find_checkpoint(run) / "ema.safetensors", shipped / "model.safetensors")
    monkeypatch.setattr(demo, "DEFAULT_MODEL", shipped)
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-train"]) == 0
    grid = Image.open(tmp_path / "d" / "default_model.png")
    assert json.loads(grid.text["prompts"]) == demo.demo_prompts()
    assert not (tmp_path / "d" / "run").exists()

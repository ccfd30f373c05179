"""`rectflow eval` end to end on a tiny run directory written with the trainer's own checkpoint code."""
import copy
import json

import pytest
import torch

from rectflow.cli import main
from rectflow.config import TrainConfig
from rectflow.data.shapes import CATEGORIES
from rectflow.evaluate.protocol import Setting, eval_set, reference_fit
from rectflow.evaluate.run import parse_settings
from rectflow.train import build_model, save_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A shapes run at 32 px: depth 1, hidden 48, patch 4, MiniLM conditioning; EMA and raw weights differ."""
    run = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(depth=1, hidden=48, heads=2, patch_size=4, resolution=32, sample_every=0).validate()
    cfg.save(run / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, latent_size=32, context_dim=384, pooled_dim=384)
    with torch.no_grad():  # leave the zero-initialised output layers: the sampler must see a non-zero velocity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    save_checkpoint(run, 7, model, ema, {"step": 7}, cfg)
    return run


@pytest.mark.slow
def test_eval_command_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "report" / "eval.json"
    rc = main(["eval", "--run", str(tiny_run), "--out", str(out), "--samples", "12", "--settings", "2x1.0,3x2.5",
               "--val-samples", "8", "--ref-samples", "40", "--batch-size", "12", "--device", "cpu"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["encoder"].startswith("rectflow-scorer@")
    assert set(report["val_loss"]) == {"ema", "raw"}
    for v in report["val_loss"].values():
        assert len(v["loss"]) == 8 and v["t"][0] == 0.0625 and v["mean"] > 0
    assert report["val_loss"]["ema"]["mean"] != report["val_loss"]["raw"]["mean"]
    labels = ["ema/euler-2/cfg-1", "ema/euler-3/cfg-2.5", "raw/euler-2/cfg-1", "raw/euler-3/cfg-2.5"]
    assert [r["label"] for r in report["results"]] == labels
    assert list(report["fid"]) == labels and list(report["clip_score"]) == labels and list(report["geneval"]) == labels
    for label in labels:
        assert report["fid"][label] > 0 and 0 <= report["clip_score"][label] <= 100
        scores = report["geneval"][label]
        assert scores["counts"] == {c: 2 for c in CATEGORIES}  # 12 prompts, interleaved: 2 per category
        assert 0 <= scores["overall"] <= 1
    assert report["fid"]["ema/euler-2/cfg-1"] != report["fid"]["raw/euler-2/cfg-1"]
    # real renders of the same prompts: every GenEval category right, FID far below that of the random model's images
    truth = report["ground_truth"]
    assert truth["geneval"]["overall"] == 1.0
    assert truth["fid"] < 0.5 * min(report["fid"].values())
    s = report["settings"]
    assert s["samples"] == 12 and s["sampler"][1] == {"solver": "euler", "steps": 3, "cfg": 2.5}
    assert s["fid_reference"]["n"] == 40
    assert s["checkpoints"]["raw"].endswith("step_00000007/model.safetensors")
    assert s["checkpoints"]["ema"].endswith("step_00000007/ema.safetensors")
    md = out.with_suffix(".md").read_text()
    assert report["encoder"] in md and "| ema | 2 | 1 |" in md and "color_attr" in md
    assert "| real images | - | - |" in md
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_reference_features_are_cached(tiny_run):
    from rectflow.evaluate.features import load_encoder
    encoder = load_encoder("scorer")
    first = reference_fit(encoder, "shapes", 32, 20, {}, tiny_run / "cache")
    second = reference_fit(encoder, "shapes", 32, 20, {}, tiny_run / "cache")
    assert not first["cached"] and second["cached"] and first["cache"] == second["cache"]
    assert torch.equal(first["fit"].sigma, second["fit"].sigma)


def test_reference_cache_is_written_atomically(tmp_path, monkeypatch):
    """A write cut short leaves no cache file (a reader computes the fit again, never reads half a file)."""
    import safetensors.torch

    from rectflow.evaluate.features import load_encoder
    encoder = load_encoder("scorer")
    real_save = safetensors.torch.save_file

    def cut_short(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(OSError, match="disk full"):
        reference_fit(encoder, "shapes", 32, 4, {}, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    first = reference_fit(encoder, "shapes", 32, 4, {}, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first["cache"].rsplit("/", 1)[-1]]
    assert reference_fit(encoder, "shapes", 32, 4, {}, tmp_path / "cache")["cached"]


@pytest.mark.slow
def test_eval_loads_a_baseline_run(tmp_path):
    """A run of another architecture (arch: dit) is evaluated through its stored "arch"."""
    cfg = TrainConfig(arch="dit", depth=1, hidden=48, heads=2, patch_size=4, resolution=32, sample_every=0).validate()
    cfg.save(tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, latent_size=32, context_dim=384, pooled_dim=384)
    save_checkpoint(tmp_path, 3, model, copy.deepcopy(model), {"step": 3}, cfg)
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(tmp_path), "--out", str(out), "--samples", "2", "--settings", "1x1.0",
                 "--weights", "ema", "--val-samples", "2", "--ref-samples", "4", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["checkpoints"]["ema"].endswith("step_00000003/ema.safetensors")
    assert report["val_loss"]["ema"]["mean"] > 0 and len(report["results"]) == 1


def test_eval_prompts_and_settings():
    prompts, metas = eval_set("shapes", 32, 9, seed=0, data_options={})
    assert len(prompts) == 9 and [m["category"] for m in metas[:6]] == list(CATEGORIES)
    prompts, metas = eval_set("emoji", 32, 3, seed=0, data_options={})
    assert metas is None and len(prompts) == 3
    assert parse_settings("50x1.0,50x2.5,50x5.0,5x5.0,10x5.0,25x5.0") == [
        (50, 1.0), (50, 2.5), (50, 5.0), (5, 5.0), (10, 5.0), (25, 5.0)]
    with pytest.raises(ValueError, match="STEPSxCFG"):
        parse_settings("50,5")
    # one Setting for `rectflow eval` (labels in reports) and the studies (keys of files on disk)
    assert (Setting("ema", 50, 5.0).label, Setting("ema", 50, 5.0).key) == ("ema/euler-50/cfg-5",
                                                                           "ema-euler50-cfg5-shifttrain")
    assert Setting("raw", 25, 2.5, shift=1.5).key == "raw-euler25-cfg2.5-shift1.5"


def test_eval_command_errors(tiny_run, tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path), "--samples", "4"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["eval", "--run", str(tiny_run), "--samples", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_one_checkpoint_for_all_weight_sets_and_atomic_outputs(tmp_path, monkeypatch):
    """A run that writes a new checkpoint during the evaluation is still evaluated from the one it started with; a
    failure while writing the outputs leaves the previous ones whole."""
    import rectflow.evaluate.run as run_mod
    import rectflow.evaluate.val_loss as val_loss_mod
    from rectflow.evaluate.run import evaluate_run, write_outputs
    cfg = TrainConfig(depth=1, hidden=48, heads=2, patch_size=4, resolution=32, sample_every=0).validate()
    cfg.save(tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, latent_size=32, context_dim=384, pooled_dim=384)
    save_checkpoint(tmp_path, 7, model, copy.deepcopy(model), {"step": 7}, cfg)
    real = val_loss_mod.validation_loss

    def training_goes_on(*args, **kw):  # the run checkpoints step 8 while the EMA weights are evaluated
        if not (tmp_path / "checkpoints" / "step_00000008").exists():
            save_checkpoint(tmp_path, 8, model, copy.deepcopy(model), {"step": 8}, cfg)
        return real(*args, **kw)

    monkeypatch.setattr(val_loss_mod, "validation_loss", training_goes_on)
    report = evaluate_run(str(tmp_path), samples=2, settings=[(1, 1.0)], val_samples=2, ref_samples=4,
                          batch_size=2, progress=False)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert report["settings"]["checkpoints"] == {"ema": str(tmp_path / "checkpoints/step_00000007/ema.safetensors"),
                                                 "raw": str(tmp_path / "checkpoints/step_00000007/model.safetensors")}
    out = tmp_path / "eval" / "eval.json"
    paths = write_outputs(report, out)
    before = {p: p.read_bytes() for p in paths}

    def plot_fails(report, path):  # a plot cut short, e.g. by a full disk
        path.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(run_mod, "plot", plot_fails)
    with pytest.raises(OSError, match="disk full"):
        write_outputs({**report, "run": "another run"}, out)
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json", "eval.md", "eval.png"]


def test_eval_of_a_checkpoint_outside_a_run(tiny_run, tmp_path, capsys):
    """`rectflow eval --checkpoint`: a weights file with its training config (here a run's EMA file) scores as the
    run's EMA does (same prompts, noise and reference); it needs --out, and --run xor --checkpoint."""
    from rectflow.runs import find_checkpoint
    common = ["--samples", "6", "--settings", "2x1.0", "--val-samples", "4", "--ref-samples", "12", "--device", "cpu"]
    assert main(["eval", "--run", str(tiny_run), "--weights", "ema", "--out", str(tmp_path / "a.json"), *common]) == 0
    ema = find_checkpoint(tiny_run) / "ema.safetensors"
    assert main(["eval", "--checkpoint", str(ema), "--out", str(tmp_path / "b.json"),
                 "--cache-dir", str(tiny_run / "cache"), *common]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["fid"] == b["fid"] and a["geneval"] == b["geneval"] and a["val_loss"] == b["val_loss"]
    # --data: another data set's prompts and reference (a DPO run's pairs have none); shapes at the run's options
    assert main(["eval", "--checkpoint", str(ema), "--out", str(tmp_path / "c.json"), "--data", "shapes",
                 *common]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["settings"]["data"] == "shapes" and set(c["geneval"]) == set(b["geneval"])
    assert main(["eval", "--checkpoint", str(ema), *common]) == 2
    assert "needs --out" in capsys.readouterr().err


def test_relation_probe_reads_the_side_of_each_pair(tiny_run):
    """scripts/relation_probe.py: a render is right for its prompt and 'wrong side' for the opposite relation, an
    absent object is 'missing'; the probe of a run reports both prompt sets and the pairs."""
    import sys
    from pathlib import Path
    from rectflow.data.shapes import eval_prompts, render_scene
    from rectflow.evaluate.geneval import ShapesDetector
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from relation_probe import OPPOSITE, failure, probe
    meta = eval_prompts(1, seed=3, categories=("position",))[0]
    found = ShapesDetector()(render_scene(meta, 32))
    assert failure(meta, found) == "ok"
    assert failure({**meta, "relation": OPPOSITE[meta["relation"]]}, found) == "wrong side"
    used = {o["color"] for o in meta["objects"]}
    other = {**meta["objects"][1], "color": next(c for c in ("red", "blue", "green") if c not in used)}
    assert failure({**meta, "objects": [meta["objects"][0], other]}, found) == "missing"
    report = probe(str(tiny_run), prompts=2)
    assert report["prompts"] == 2 and set(report["accuracy"]) == {"prompt", "opposite"}
    assert report["both_right"] + report["one_right"] <= 2
    assert sum(report["failures"]["prompt"].values()) == 2

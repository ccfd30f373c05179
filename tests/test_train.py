"""The trainer: config parsing, schedules, EMA maths, checkpoints, exact resume after SIGKILL, non-finite steps."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rectflow import train as train_mod
from rectflow import runs as runs_mod
from rectflow.training import loop as loop_mod
from rectflow.config import FIELDS, TrainConfig, apply_overrides, load_config
from rectflow.train import (
    TrainingAborted,
    ema_decay_at,
    ema_update,
    find_checkpoint,
    load_state,
    lr_at,
    step_indices,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
# a model small enough that a step takes milliseconds: 16 px, patch 4 (16 tokens), one block of width 64; one-object
# scenes only, so there are 18 distinct captions to encode
TINY = {"resolution": 16, "patch_size": 4, "depth": 1, "hidden": 64, "heads": 2, "batch_size": 8,
        "warmup_steps": 2, "log_every": 1, "sample_every": 0, "checkpoint_every": 0,
        "data_options": {"categories": ["single_object"]}}
TINY_FLAGS = ["--resolution", "16", "--patch-size", "4", "--depth", "1", "--hidden", "64", "--heads", "2",
              "--batch-size", "8", "--warmup-steps", "2", "--log-every", "1",
              "--set", "data_options.categories=[single_object]"]


def tiny(**changes) -> TrainConfig:
    """The tiny config with changes."""
    return TrainConfig.from_dict({**TINY, **changes})


def losses(run_dir: Path) -> list:
    """The loss of every step in metrics.jsonl, in order (None for skipped steps)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


# ---------------------------------------------------------------- config


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'lrr'"):
        apply_overrides(TrainConfig(), ["lrr=1e-3"])
    with pytest.raises(ValueError, match="'lr' expects float"):
        apply_overrides(TrainConfig(), ["lr=fast"])
    with pytest.raises(ValueError, match="'depth' expects int"):
        apply_overrides(TrainConfig(), ["depth=2.5"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(TrainConfig(), ["depth"])
    with pytest.raises(ValueError, match="'qk_norm'.*'rms'"):
        apply_overrides(TrainConfig(), ["qk_norm=rmsnorm"]).validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nbatchsize: 4\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*'batchsize'"):
        load_config(bad)


def test_cli_rejects_bad_override(tmp_path, capsys):
    from rectflow.cli import main
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "emma_decay=0.9"]) == 2
    assert "'emma_decay'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--formulation", "rf/lognorm(0, -1)"], "config key 'formulation': invalid formulation 'rf/lognorm(0, -1)'"),
    (["--formulation", "rf/flow"], "config key 'formulation': unknown formulation 'rf/flow'"),
    (["--data", "/nonexistent/images"], "unknown data set '/nonexistent/images'"),
    (["--text-encoder", "bert"], "unknown text encoder spec 'bert'"),
    (["--text-encoder", "sd3:clip_l=/nonexistent/clip"], "no config.json in /nonexistent/clip"),
    (["--resolution", "18"], "config key 'resolution': 18 px"),
    (["--set", "data_options.colour=red"], "config key 'data_options'"),
])
def test_cli_config_errors_are_clean(tmp_path, capsys, flags, message):
    """Errors of the config or of what it names: one `rectflow train: ...` line and exit code 2, no traceback."""
    from rectflow.cli import main
    assert main(["train", "--out", str(tmp_path / "r"), *TINY_FLAGS, *flags]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rectflow train: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_override_precedence_and_values(tmp_path):
    import argparse

    from rectflow.train import add_arguments, config_from_args
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.002\ndepth: 3\nbetas: [0.9, 0.95]\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(cfg_file), "--depth", "4", "--set", "depth=5", "--no-bf16",
                              "--set", "data_options.categories=[counting]", "--hidden", "128",
                              "--set", "heads=null"])
    cfg = config_from_args(args)
    assert cfg.lr == 0.002 and cfg.depth == 5 and cfg.betas == [0.9, 0.95] and cfg.bf16 is False
    assert cfg.data_options == {"categories": ["counting"]} and cfg.hidden == 128 and cfg.heads is None
    assert TrainConfig().effective_adam_eps == 1e-15  # qk-norm on: the paper's eps
    assert apply_overrides(TrainConfig(), ["qk_norm=none"]).effective_adam_eps == 1e-8


def test_a_fine_tune_takes_the_init_model_s_autoencoder_and_text_encoder_unless_named(tmp_path, capsys):
    import argparse

    from rectflow.train import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run = tmp_path / "latent"
    train_mod.train(tiny(autoencoder="shapes-ae", patch_size=1, text_encoder="minilm:length=8", max_steps=1,
                         sample_every=0), run)

    def cfg(*extra):
        return config_from_args(parser.parse_args(["--init", str(run), "--out", str(tmp_path / "ft"), *extra]))
    got = cfg()
    assert (got.autoencoder, got.text_encoder) == ("shapes-ae", "minilm:length=8")
    assert "from the init model's training config" in capsys.readouterr().err
    got = cfg("--text-encoder", "minilm", "--set", "autoencoder=identity")  # named: the run's own choice
    assert (got.autoencoder, got.text_encoder) == ("identity", "minilm")
    config = tmp_path / "c.yaml"
    config.write_text("text_encoder: minilm:length=16\n")
    assert cfg("--config", str(config)).text_encoder == "minilm:length=16"


def _resume_args(out: Path, *extra: str):
    """Parsed `rectflow train --out OUT --resume ...` arguments."""
    import argparse

    from rectflow.train import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", str(out), "--resume", *extra])


def test_resume_refuses_a_new_max_steps_under_the_cosine_schedule(tmp_path, capsys):
    from rectflow.cli import main
    from rectflow.train import config_from_args
    cosine, constant = tmp_path / "cosine", tmp_path / "constant"
    for run, schedule in ((cosine, "cosine"), (constant, "constant")):
        run.mkdir()
        tiny(max_steps=10, lr_schedule=schedule).save(run / "config.yaml")
    with pytest.raises(ValueError, match=r"max_steps \(10 -> 20\).*'cosine'"):
        config_from_args(_resume_args(cosine, "--max-steps", "20"))
    assert main(["train", "--out", str(cosine), "--resume", "--max-steps", "20"]) == 2
    assert "cannot change max_steps (10 -> 20)" in capsys.readouterr().err
    assert config_from_args(_resume_args(cosine, "--max-steps", "10", "--log-every", "5")).log_every == 5
    assert config_from_args(_resume_args(constant, "--max-steps", "20")).max_steps == 20


def test_resume_applies_config_as_checked_overrides(tmp_path):
    from rectflow.train import config_from_args
    run = tmp_path / "r"
    run.mkdir()
    tiny(max_steps=10).save(run / "config.yaml")
    bookkeeping, compute = tmp_path / "b.yaml", tmp_path / "c.yaml"
    bookkeeping.write_text("log_every: 7\nsample_every: 0\n")
    compute.write_text("lr: 0.005\nlog_every: 7\n")
    cfg = config_from_args(_resume_args(run, "--config", str(bookkeeping)))
    assert cfg.log_every == 7 and cfg == dataclasses.replace(tiny(max_steps=10), log_every=7)
    with pytest.raises(ValueError, match=r"cannot change lr: 0.001 -> 0.005"):
        config_from_args(_resume_args(run, "--config", str(compute)))


def test_help_documents_every_field():
    import argparse

    from rectflow.config import FIELDS
    from rectflow.train import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    docs = (ROOT / "docs" / "training.md").read_text()
    for name in FIELDS:
        assert f"`{name}`" in docs, f"docs/training.md does not document {name}"
        if name != "data_options":  # a dict: only through the config file or --set
            assert "--" + name.replace("_", "-") in text, name


def test_shipped_configs_load():
    from rectflow.demo import DEMO_RECIPE, recipe
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        if cfg.lora:  # a fine-tuning recipe: the model to fine-tune is given on the command line
            cfg = dataclasses.replace(cfg, init="MODEL")
        cfg.validate()
    assert load_config(ROOT / "configs" / "demo.yaml") == recipe()
    assert set(DEMO_RECIPE) <= set(TrainConfig().to_dict())


def test_text_drop_is_automatic_per_encoder_count(tmp_path):
    """text_drop null: 0.1 ** (1 / k) for k encoders, so 10% of samples see no text (k = 3: the paper's 0.464)."""
    from rectflow.studies.common import RECIPE, StudyOptions, study_config
    assert TrainConfig().text_drop is None
    assert TrainConfig().effective_text_drop(3) == pytest.approx(0.464, abs=5e-4)
    assert TrainConfig().effective_text_drop(1) == pytest.approx(0.1)
    assert tiny(text_drop=0.3).effective_text_drop(3) == 0.3
    with pytest.raises(ValueError, match="'text_drop'"):
        tiny(text_drop=1.5).validate()
    # the trainer resolves it with its text encoder (MiniLM: one encoder) and trains with it
    assert train_mod.Trainer(tiny(), tmp_path / "probe").text_drop == pytest.approx(0.1)
    assert _run_losses(tmp_path, "auto", bf16=False) == _run_losses(tmp_path, "explicit", bf16=False, text_drop=0.1)
    assert load_config(tmp_path / "auto" / "config.yaml").text_drop is None
    # the studies keep the value their runs were made with
    assert RECIPE["text_drop"] == 0.464
    assert study_config(StudyOptions(study="formulations"), steps=10).text_drop == 0.464


def test_arch_builds_the_baselines_at_the_mmdit_size():
    from rectflow.config import ARCHS
    from rectflow.models import baselines
    assert set(ARCHS) == set(baselines.ARCHITECTURES)
    mmdit = train_mod.build_model(tiny(), 3, 16, 384, 384)
    assert "arch" not in mmdit.config  # MM-DiT files stay as they were
    n = sum(p.numel() for p in mmdit.parameters())
    for arch in ("mmdit3", "dit", "crossdit", "uvit"):
        model = train_mod.build_model(tiny(arch=arch, grad_checkpointing=True), 3, 16, 384, 384,
                                      context_splits=[4, 4] if arch == "mmdit3" else None)
        assert isinstance(model, baselines.ARCHITECTURES[arch]) and model.gradient_checkpointing
        assert abs(sum(p.numel() for p in model.parameters()) - n) <= 0.05 * n, arch
        assert model.config["num_heads"] == 2
    assert model.config["arch"] == "uvit"
    assert train_mod.build_model(tiny(arch="mmdit3"), 3, 16, 384, 384, [4, 4]).config["context_splits"] == [4, 4]
    with pytest.raises(ValueError, match="'arch'"):
        tiny(arch="unet").validate()


def test_a_patch_wider_than_the_hidden_width_warns():
    import warnings
    with pytest.warns(UserWarning, match=r"192 values per token exceeds the hidden width 64: samples will keep 67%"):
        train_mod.build_model(tiny(patch_size=8, hidden=64, heads=2), 3, 64, 384, 384)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_mod.build_model(tiny(), 3, 16, 384, 384)


def test_context_splits_follow_the_text_encoder_parts():
    from rectflow.text import Part
    one = {"minilm": Part(slice(None), slice(None), slice(None))}
    assert train_mod.context_splits(type("T", (), {"parts": one})) is None
    sd3 = {"clip_l": Part(slice(0, 77), slice(0, 768), slice(0, 768)),
           "clip_g": Part(slice(0, 77), slice(768, 2048), slice(768, 2048)),
           "t5": Part(slice(77, 141), slice(0, 4096), slice(0, 0))}
    assert train_mod.context_splits(type("T", (), {"parts": sd3})) == [77, 64]


def test_fused_adamw_where_supported_and_old_states_keep_their_kernel():
    model = train_mod.build_model(tiny(), 3, 16, 384, 384)
    opt = train_mod.make_optimizer(model, tiny())
    assert opt.param_groups[0]["fused"] is True
    assert opt.param_groups[0]["eps"] == 1e-15 and opt.param_groups[0]["lr"] == tiny().lr
    assert not train_mod.make_optimizer(model.to(torch.bfloat16), tiny()).param_groups[0]["fused"]
    # a checkpoint written by the unfused optimizer continues with it (exact resume of older runs)
    model = model.float()
    old = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    opt = train_mod.make_optimizer(model, tiny())
    opt.load_state_dict(old.state_dict())
    assert not opt.param_groups[0]["fused"]


# ---------------------------------------------------------------- schedules, EMA, data order


def test_lr_schedule():
    cfg = tiny(lr=1e-3, warmup_steps=10, max_steps=110, lr_schedule="cosine", min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    const = tiny(lr=1e-3, warmup_steps=0, lr_schedule="constant")
    assert lr_at(0, const) == lr_at(1000, const) == 1e-3


def test_ema_update_maths():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999, warmup=True) == 0.999
    assert ema_decay_at(0, 0.99, warmup=False) == 0.99


def test_ema_in_training_follows_the_formula(tmp_path):
    """With ema_every 2 and no warm-up, the EMA is updated on even steps only, with the configured decay."""
    cfg = tiny(max_steps=2, ema_every=2, ema_decay=0.5, ema_warmup=False, checkpoint_every=1, keep_last=5)
    train(cfg, tmp_path / "r")
    from safetensors.torch import load_file
    ck = tmp_path / "r" / "checkpoints"
    raw0 = _init_weights(cfg)
    raw1, ema1 = load_file(ck / "step_00000001/model.safetensors"), load_file(ck / "step_00000001/ema.safetensors")
    raw2, ema2 = load_file(ck / "step_00000002/model.safetensors"), load_file(ck / "step_00000002/ema.safetensors")
    for k in raw0:
        torch.testing.assert_close(ema1[k], raw0[k])  # no update after step 1
        torch.testing.assert_close(ema2[k], 0.5 * raw0[k] + 0.5 * raw2[k])
    assert any(not torch.equal(raw1[k], raw0[k]) for k in raw0)


def _init_weights(cfg: TrainConfig) -> dict:
    """The initial weights a run with cfg starts from."""
    enc = train_mod._frozen_text_encoder(cfg.text_encoder, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = train_mod.build_model(cfg, 3, cfg.resolution, enc.context_dim, enc.pooled_dim)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_data_order_is_a_pure_function_of_seed_and_step():
    n = 10
    first = [i for s in range(5) for i in step_indices(0, s, 4, n)]  # two epochs of 10
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # each epoch reshuffled
    assert step_indices(0, 3, 4, n) == step_indices(0, 3, 4, n) != step_indices(1, 3, 4, n)
    assert step_indices(0, 2, 4, 10**9) == [8, 9, 10, 11]  # endless data sets are read in order


# ---------------------------------------------------------------- training behaviour


@pytest.mark.slow  # a 30-step run at batch 16, to see the loss fall
def test_loss_falls_on_shapes(tmp_path):
    cfg = tiny(max_steps=30, batch_size=16, lr=2e-3, warmup_steps=3, text_drop=0.1)
    train(cfg, tmp_path / "r")
    ls = losses(tmp_path / "r")
    assert len(ls) == 30 and all(math.isfinite(v) for v in ls)
    assert sum(ls[-5:]) / 5 < 0.7 * sum(ls[:5]) / 5, ls
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {"lr", "grad_norm", "img_per_s"} <= set(recs[-1])
    assert (tmp_path / "r" / "config.yaml").is_file() and any((tmp_path / "r" / "tb").iterdir())
    assert load_config(tmp_path / "r" / "config.yaml") == cfg


def poison_loss(monkeypatch, bad, poison: float = float("nan")) -> None:
    """Make the trainer's loss non-finite (loss + poison) on the calls, counted from 1, where bad(call) holds."""
    real, calls = train_mod.compute_loss, {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss + poison if bad(calls["n"]) else loss

    monkeypatch.setattr(loop_mod, "compute_loss", poisoned)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n in (3, 4))
    cfg = tiny(max_steps=6, checkpoint_every=1, keep_last=10, max_bad_steps=3)
    train(cfg, tmp_path / "r")
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False]
    assert recs[2]["nonfinite"] and recs[2]["bad_loss"] == "nan"
    ck = tmp_path / "r" / "checkpoints"
    # a skipped step leaves the weights unchanged: its checkpoint is written like any other
    assert sorted(d.name for d in ck.glob("step_*")) == [f"step_{s:08d}" for s in range(1, 7)]
    assert load_state(ck / "step_00000004")["bad_streak"] == 2
    state = load_state(ck / "step_00000006")
    assert state["skipped"] == 2 and state["step"] == 6
    # a skipped step never reaches the optimizer: AdamW counted 4 updates in 6 steps
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}


def test_final_checkpoint_after_a_nonfinite_last_step(tmp_path, monkeypatch):
    """The last step skipped (non-finite) still ends the run with a final checkpoint of the unchanged weights."""
    poison_loss(monkeypatch, lambda n: n == 3)
    train(tiny(max_steps=3, checkpoint_every=0, max_bad_steps=3), tmp_path / "r")
    assert losses(tmp_path / "r")[-1] is None
    final = find_checkpoint(tmp_path / "r")
    assert final is not None and final.name == "step_00000003"
    state = load_state(final)
    assert state["step"] == 3 and state["skipped"] == 1 and state["bad_streak"] == 1


def test_nonfinite_streak_aborts_with_checkpoint_intact(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n > 2, float("inf"))
    cfg = tiny(max_steps=50, checkpoint_every=2, max_bad_steps=4)
    with pytest.raises(TrainingAborted, match=r"4 non-finite .*step_00000004"):
        train(cfg, tmp_path / "r")
    # step 4 (two skipped steps in) is checkpointed with step 2's weights; the abort at step 6 writes nothing
    from safetensors.torch import load_file
    ck = tmp_path / "r" / "checkpoints"
    assert find_checkpoint(tmp_path / "r").name == "step_00000004"
    assert load_state(find_checkpoint(tmp_path / "r"))["step"] == 4
    two, four = (load_file(ck / f"step_0000000{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(two[k], four[k]) for k in two)
    assert len(losses(tmp_path / "r")) == 6


# ---------------------------------------------------------------- checkpoints


def test_run_files_get_the_umask_mode_not_the_temp_files_0600(tmp_path, monkeypatch):
    """Checkpoints and logs are written through temp files (mode 0600, folders 0700); they end with the modes a
    plain write under the user's umask gives, so a shared run directory stays readable."""
    import os
    monkeypatch.setattr("rectflow.files.UMASK", 0o022)  # read at import; the test fixes the process's too
    old = os.umask(0o022)
    try:
        train(tiny(max_steps=2, warmup_steps=0), tmp_path / "run")
    finally:
        os.umask(old)
    paths = [p for p in (tmp_path / "run").rglob("*") if ".tmp" not in p.name]
    assert any(p.suffix == ".safetensors" for p in paths)
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_checkpoint_directory_is_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    """fsync order of save_checkpoint: the three files, the temp directory, then (after the rename) its parent."""
    events = []
    real_fsync, real_replace = runs_mod.fsync, os.replace
    monkeypatch.setattr(runs_mod, "fsync", lambda p: (events.append(("fsync", Path(p))), real_fsync(p)))
    monkeypatch.setattr(runs_mod.os, "replace", lambda a, b: (events.append(("replace", Path(a))), real_replace(a, b)))
    model = train_mod.build_model(tiny(), 3, 16, 384, 384)
    ck_root = tmp_path / "checkpoints"
    train_mod.save_checkpoint(tmp_path, 1, model, model, {"step": 1}, tiny())
    rename = next(i for i, (kind, p) in enumerate(events) if kind == "replace" and p.name.startswith(".tmp-step_"))
    tmp_dir = events[rename][1]
    synced = [p for kind, p in events[:rename] if kind == "fsync"]
    assert {p.name for p in synced if p.parent == tmp_dir} == {"model.safetensors", "ema.safetensors", "state.pt"}
    assert synced[-1] == tmp_dir  # the directory, after its files and before the rename
    assert events[rename + 1] == ("fsync", ck_root)


def test_stale_temp_and_broken_pointer_do_not_break_loading(tmp_path):
    run = tmp_path / "r"
    train(tiny(max_steps=4, checkpoint_every=2, keep_last=2), run)
    ck = run / "checkpoints"
    assert sorted(d.name for d in ck.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (ck / "latest").read_text().strip() == "step_00000004"
    # a kill during a save leaves a temp dir (and maybe half a file); the pointer still names a complete checkpoint
    stale = ck / ".tmp-step_00000006-xyz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    (ck / ".tmp-latest-abc").write_text("step_00000006")
    assert find_checkpoint(run).name == "step_00000004"
    # a pointer to a missing or incomplete checkpoint falls back to the newest complete one
    (ck / "latest").write_text("step_00000006\n")
    assert find_checkpoint(run).name == "step_00000004"
    (ck / "step_00000008").mkdir()
    (ck / "step_00000008" / "state.pt").write_bytes(b"junk")
    assert find_checkpoint(run).name == "step_00000004"
    # resuming cleans the temp files and continues from step 4
    train(tiny(max_steps=5, checkpoint_every=2, keep_last=2), run, resume=True)
    assert not stale.exists() and not (ck / ".tmp-latest-abc").exists()
    assert find_checkpoint(run).name == "step_00000005"
    assert load_state(find_checkpoint(run))["step"] == 5
    assert len(losses(run)) == 5


def test_config_and_metrics_rewrites_are_atomic(tmp_path, monkeypatch):
    """On start and resume config.yaml and metrics.jsonl are replaced whole (temp file + os.replace): a failure in
    the middle leaves the old files as they were."""
    run = tmp_path / "r"
    cfg = tiny(max_steps=2, checkpoint_every=1)
    train(cfg, run)
    with open(run / "metrics.jsonl", "a") as fh:  # a step logged after the last checkpoint, then a kill
        fh.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    originals = {name: (run / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    real_replace = os.replace
    for name in originals:
        def failing(src, dst, name=name):
            if Path(dst).name == name:
                raise OSError(f"simulated crash while replacing {name}")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(OSError, match=f"simulated crash while replacing {name}"):
            train(cfg, run, resume=True)
        monkeypatch.setattr(os, "replace", real_replace)
        assert {n: (run / n).read_text() for n in originals} == originals
        assert not list(run.glob(".*.tmp"))  # the temp file is removed
    inode = (run / "metrics.jsonl").stat().st_ino
    train(cfg, run, resume=True)
    assert len(losses(run)) == 2 and (run / "metrics.jsonl").stat().st_ino != inode


def _train_cmd(run: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "rectflow.cli", "train", "--out", str(run), "--max-steps", str(steps),
           "--checkpoint-every", "3", "--sample-every", "4", "--sample-steps", "2", "--seed", "7", *TINY_FLAGS]
    return cmd + ["--resume"] if resume else cmd


def kill_after_checkpoint(cmd: list[str], run: Path, env: dict, step: int = 6) -> None:
    """Start a `rectflow train` command and SIGKILL it once checkpoint `step` (or a later one) is its latest."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (pointer.exists() and pointer.read_text().strip() >= f"step_{step:08d}") and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # three CLI subprocesses, one killed
def test_sigkill_resume_is_bit_exact(tmp_path):
    """A run killed with SIGKILL after a checkpoint and resumed logs exactly the losses of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 40
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, steps), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    run = tmp_path / "killed"
    kill_after_checkpoint(_train_cmd(run, steps), run, env)
    killed_at = len(losses(run))
    assert killed_at < steps, "the run finished before it was killed"
    subprocess.run(_train_cmd(run, steps, resume=True), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    assert losses(run) == losses(ref)  # bit for bit
    from safetensors.torch import load_file
    a = load_file(find_checkpoint(ref) / "ema.safetensors")
    b = load_file(find_checkpoint(run) / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    grids = [sorted(p.name for p in (r / "samples").glob("*.png")) for r in (run, ref)]
    assert grids[0] == grids[1] and len(grids[0]) == 10


def test_latent_training_on_a_folder_with_a_small_autoencoder(tmp_path):
    """A finite data set (a folder of captioned images) through a small autoencoder: latents encoded once into the
    cache, every caption's text features computed before the first step."""
    from PIL import Image

    from rectflow.autoencoder import SmallAE
    from rectflow.sample import generate, load_pipeline
    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 80, 220)}
    for i, (name, rgb) in enumerate(colours.items()):
        for j in range(4):
            Image.new("RGB", (24, 24), rgb).save(folder / f"{name}{j}.png")
            (folder / f"{name}{j}.txt").write_text(f"a plain {name} square number {j}")
    torch.manual_seed(0)
    ae_path = tmp_path / "ae.safetensors"
    SmallAE(channels=4, factor=2, width=8).save(ae_path)
    cfg = tiny(data=str(folder), data_options={"val_every": 4}, autoencoder=f"small:{ae_path}", patch_size=2,
               max_steps=3, checkpoint_every=3, batch_size=4)
    trainer = train_mod.Trainer(cfg, tmp_path / "r")
    assert trainer.latent_shape == (4, 8, 8) and len(trainer.dataset) == 9
    assert trainer.batches.cache.get(list(range(9))).shape == (9, 4, 8, 8)
    assert set(trainer.text.table) == set(trainer.dataset.captions)  # encoded before step 1
    trainer.fit()
    assert len(list((tmp_path / "r" / "cache").glob("latents-*/shard_*.safetensors"))) == 1
    assert all(math.isfinite(v) for v in losses(tmp_path / "r"))
    images = generate(load_pipeline(run=str(tmp_path / "r")), ["a plain red square"], steps=2)
    assert images.shape == (1, 3, 16, 16)


def _run_losses(tmp_path, name: str, **changes) -> list:
    """Losses of a 3-step tiny run with changes."""
    train(tiny(**{"max_steps": 3, "warmup_steps": 1, **changes}), tmp_path / name)
    return losses(tmp_path / name)


@pytest.mark.slow  # about twenty short training runs
def test_every_option_acts(tmp_path, monkeypatch):
    """Each training option changes the run as it should (and grad checkpointing / accumulation do not)."""
    monkeypatch.setenv("RECTFLOW_CPU_BF16", "1")  # bf16: true acts also on a CPU that emulates bf16
    base = _run_losses(tmp_path, "base", bf16=False)
    assert _run_losses(tmp_path, "again", bf16=False) == base  # deterministic
    assert _run_losses(tmp_path, "ckpt", bf16=False, grad_checkpointing=True) == base
    accum = _run_losses(tmp_path, "accum", bf16=False, grad_accum=2)
    torch.testing.assert_close(torch.tensor(accum), torch.tensor(base), rtol=1e-5, atol=1e-6)
    # options that act on the data, t, noise, conditioning or the network (the zero-initialised output layer makes
    # the first loss independent of t and of the network, so some of them show from the second step on)
    for change in ({"seed": 1}, {"shift": 3.0}, {"formulation": "eps/linear"}, {"bf16": True},
                   {"text_drop": 0.0}, {"qk_norm": "none"}, {"patch_size": 2}, {"arch": "dit"}):
        other = _run_losses(tmp_path, "x", **{"bf16": False, **change})
        assert other != base, change
        shutil.rmtree(tmp_path / "x")
    # options that act through the optimizer, hence from the second step on
    for change in ({"lr": 3e-3}, {"grad_clip": 0.0}, {"weight_decay": 0.5}, {"betas": [0.5, 0.9]},
                   {"adam_eps": 1e-2}, {"warmup_steps": 3}):
        other = _run_losses(tmp_path, "x", **{"bf16": False, **change})
        assert other[0] == base[0] and other[1:] != base[1:], change
        shutil.rmtree(tmp_path / "x")


def test_sample_grid_options(tmp_path):
    from PIL import Image
    prompts = ["a red circle", "a blue square"]
    train(tiny(max_steps=2, sample_every=2, sample_prompts=prompts, sample_steps=2, sample_solver="heun",
               sample_cfg=1.5, shift=2.0), tmp_path / "r")
    grid = Image.open(tmp_path / "r" / "samples" / "step_00000002.png")
    meta = json.loads(grid.text["rectflow"])
    assert json.loads(grid.text["prompts"]) == prompts
    assert (meta["steps"], meta["solver"], meta["cfg_scale"], meta["shift"], meta["weights"]) == (2, "heun", 1.5,
                                                                                                  2.0, "ema")


def test_default_config_file_is_the_dataclass_defaults():
    """configs/default.yaml lists every field at TrainConfig's default, with each field's help above it."""
    path = ROOT / "configs" / "default.yaml"
    assert load_config(path) == TrainConfig()
    text = path.read_text()
    for name, f in FIELDS.items():
        assert f"# {f.metadata['help']}\n{name}:" in text, name


def test_resume_changeable_fields_are_declared_on_the_fields():
    from rectflow.config import RESUME_CHANGEABLE
    assert {"max_steps", "checkpoint_every", "device", "cache_dir"} <= RESUME_CHANGEABLE
    assert not {"lr", "seed", "batch_size", "formulation", "data"} & RESUME_CHANGEABLE
    assert RESUME_CHANGEABLE == {n for n, f in FIELDS.items() if f.metadata["resume"]}


@pytest.mark.slow  # loader worker processes
def test_loader_workers_give_the_same_run_and_resume_exactly(tmp_path):
    base = dict(max_steps=4, checkpoint_every=2, lr_schedule="constant")
    train_mod.train(tiny(**base), tmp_path / "plain")
    first = train_mod.Trainer(tiny(**{**base, "workers": 2, "max_steps": 2}), tmp_path / "workers")
    first.fit()
    second = train_mod.Trainer(tiny(**base, workers=2), tmp_path / "workers", resume=True)
    second.fit()
    assert first.batches.from_workers == 2 and second.batches.from_workers == 2  # every batch came from the loader
    assert losses(tmp_path / "workers") == losses(tmp_path / "plain")


def test_profile_trace_and_data_wait_are_written(tmp_path):
    train_mod.train(tiny(max_steps=4, profile_steps=2), tmp_path / "r")
    traces = list((tmp_path / "r" / "profile").glob("trace_steps_2-3.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_wait"] < 1 for r in recs)


@pytest.mark.slow  # compiles the blocks (~20 s)
def test_compiled_blocks_give_matching_losses(tmp_path):
    train_mod.train(tiny(max_steps=3, bf16=False), tmp_path / "eager")
    train_mod.train(tiny(max_steps=3, bf16=False, compile=True), tmp_path / "compiled")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_sharded_checkpoints_resume_exactly_and_load_everywhere(tmp_path):
    """A one-process run with checkpoint_format: sharded (asynchronous torch.distributed.checkpoint folders):
    resumed from its middle checkpoint it logs the uninterrupted losses, its EMA consolidates to the weights of a
    run with ordinary checkpoints, and sample --run and convert read it."""
    from safetensors.torch import load_file

    from rectflow.cli import main
    cfg = tiny(max_steps=6, checkpoint_every=3, checkpoint_format="sharded", lr_schedule="constant")
    ref, cut, full = tmp_path / "ref", tmp_path / "cut", tmp_path / "full"
    train(cfg, ref)
    train(dataclasses.replace(cfg, checkpoint_format="full"), full)
    assert losses(ref) == losses(full)
    ck = find_checkpoint(ref)
    assert ck.name == "step_00000006" and (ck / "ema.dcp" / "rectflow.json").is_file()
    assert not list((ref / "checkpoints").glob(".tmp-*"))
    train(dataclasses.replace(cfg, max_steps=3), cut)
    train(cfg, cut, resume=True)
    assert losses(cut) == losses(ref)
    assert main(["convert", str(ref), str(tmp_path / "ema.safetensors")]) == 0
    got, want = load_file(tmp_path / "ema.safetensors"), load_file(find_checkpoint(full) / "ema.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["sample", "--run", str(ref), "--prompt", "a red circle", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_bf16_falls_back_to_fp32_on_a_cpu_that_emulates_it(tmp_path, monkeypatch, capsys):
    """On a CPU without native bf16 (rectflow.devices.native_bf16) bf16: true trains in fp32 and says so; the
    config keeps bf16: true, so the same run resumes on a machine that has it."""
    from rectflow.devices import native_bf16
    monkeypatch.setenv("RECTFLOW_CPU_BF16", "0")
    assert not native_bf16(torch.device("cpu"))
    fallback = _run_losses(tmp_path, "fallback", bf16=True)
    assert "no native bf16" in capsys.readouterr().err
    assert load_config(tmp_path / "fallback" / "config.yaml").bf16 is True
    assert fallback == _run_losses(tmp_path, "fp32", bf16=False)
    # a full fine-tune's weights are fp32 too; a LoRA over bf16 frozen weights needs bf16 autocast and keeps it
    init = str(tmp_path / "fp32")
    assert _run_losses(tmp_path, "ft", bf16=True, init=init) == _run_losses(tmp_path, "ft32", bf16=False, init=init)
    assert "no native bf16" in capsys.readouterr().err
    _run_losses(tmp_path, "lora", bf16=True, init=init, lora=2)
    assert "no native bf16" not in capsys.readouterr().err
    monkeypatch.setenv("RECTFLOW_CPU_BF16", "1")
    assert native_bf16(torch.device("cpu"))
    assert _run_losses(tmp_path, "bf16", bf16=True) != fallback

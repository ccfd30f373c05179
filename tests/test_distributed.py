"""DDP on CPU: 2 gloo processes on localhost train like 1 process with the same global batch (fp32)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rectflow.config import TrainConfig
from rectflow.train import find_checkpoint, load_state, train

CFG = {"resolution": 16, "patch_size": 4, "depth": 1, "hidden": 64, "heads": 2, "batch_size": 8, "max_steps": 4,
       "warmup_steps": 1, "sample_every": 0, "checkpoint_every": 0,
        "data_options": {"categories": ["single_object"]}, "bf16": False, "text_drop": 0.5,
       "grad_clip": 0.05}  # clipping active: the global gradient norm must be the same in both set-ups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    """One torchrun-like process: the launcher's environment variables, then the ordinary train()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig.from_dict(cfg), out)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three spawned processes
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    mp.start_processes(_worker, args=(1, _free_port(), str(one), CFG), nprocs=1, start_method="spawn")
    mp.start_processes(_worker, args=(2, _free_port(), str(two), CFG), nprocs=2, start_method="spawn")
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    wa = load_file(find_checkpoint(one) / "model.safetensors")
    wb = load_file(find_checkpoint(two) / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the logs: one line per step; the checkpoint records the job's size
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 4
    assert load_state(find_checkpoint(two))["world_size"] == 2
    assert load_state(find_checkpoint(one))["world_size"] == 1


@pytest.mark.slow  # five spawned processes
def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path):
    plain, fsdp, cut = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "cut"
    sharded = {**CFG, "parallel": "fsdp", "checkpoint_every": 2, "lr_schedule": "constant"}
    mp.start_processes(_worker, args=(1, _free_port(), str(plain), {**sharded, "parallel": "ddp"}), nprocs=1,
                       start_method="spawn")
    mp.start_processes(_worker, args=(2, _free_port(), str(fsdp), sharded), nprocs=2, start_method="spawn")
    a, b = _losses(plain), _losses(fsdp)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    wa, wb = (load_file(find_checkpoint(r) / "model.safetensors") for r in (plain, fsdp))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert load_state(find_checkpoint(fsdp))["optimizer_format"] == "fqn"
    # saved by 2 sharded processes at step 2, continued by 1 plain one: the next losses are the same
    mp.start_processes(_worker, args=(2, _free_port(), str(cut), {**sharded, "max_steps": 2}), nprocs=2,
                       start_method="spawn")
    mp.start_processes(_resume_worker, args=(1, _free_port(), str(cut), {**sharded, "parallel": "ddp"}), nprocs=1,
                       start_method="spawn")
    torch.testing.assert_close(torch.tensor(_losses(cut)), torch.tensor(b), rtol=1e-5, atol=1e-6)


def _resume_worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig.from_dict(cfg), out, resume=True)


@pytest.mark.slow  # six spawned processes
def test_hsdp_and_bf16_mixed_precision(tmp_path, monkeypatch):
    """hsdp (replicated across 2 groups of 1) gives the fp32 losses of one process; FSDP2's bf16 parameters with
    fp32 reduction stay within bf16 noise of one process under bf16 autocast."""
    monkeypatch.setenv("RECTFLOW_CPU_BF16", "1")  # bf16 also on a CPU that emulates it (the spawned ranks inherit it)
    runs = {"one": ({**CFG}, 1), "hsdp": ({**CFG, "parallel": "hsdp", "fsdp_shard_size": 1}, 2),
            "one_bf16": ({**CFG, "bf16": True}, 1), "mixed": ({**CFG, "parallel": "fsdp", "bf16": True}, 2)}
    for name, (cfg, n) in runs.items():
        mp.start_processes(_worker, args=(n, _free_port(), str(tmp_path / name), cfg), nprocs=n, start_method="spawn")
    got = {name: torch.tensor(_losses(tmp_path / name)) for name in runs}
    torch.testing.assert_close(got["hsdp"], got["one"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["mixed"], got["one_bf16"], rtol=2e-3, atol=0)
    assert not torch.equal(got["mixed"], got["one"])  # it did run in bf16


@pytest.mark.slow  # seven spawned processes
def test_fsdp_lora_with_grids_and_validation_matches_one_and_resumes(tmp_path):
    """A LoRA fine-tune under FSDP (sharded adapters and EMA; every rank drawing the grids and validating) gives the
    losses, validation losses, grids and LoRA files of one process, and resumes from its sharded run exactly."""
    mp.start_processes(_worker, args=(1, _free_port(), str(tmp_path / "base"), CFG), nprocs=1, start_method="spawn")
    lora = {**CFG, "init": str(tmp_path / "base"), "lora": 4, "lora_targets": "all-linear", "lr": 1e-2,
            "lr_schedule": "constant", "checkpoint_every": 2, "sample_every": 2, "sample_steps": 2, "val_every": 2,
            "val_size": 4}
    one, fsdp, cut = tmp_path / "one", tmp_path / "fsdp", tmp_path / "cut"
    mp.start_processes(_worker, args=(1, _free_port(), str(one), lora), nprocs=1, start_method="spawn")
    sharded = {**lora, "parallel": "fsdp"}
    mp.start_processes(_worker, args=(2, _free_port(), str(fsdp), sharded), nprocs=2, start_method="spawn")
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6)

    def val(run):
        return [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in line]
    torch.testing.assert_close(torch.tensor(val(fsdp)), torch.tensor(val(one)), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (fsdp / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = (load_file(find_checkpoint(r) / name) for r in (one, fsdp))
        assert set(wa) == set(wb) and all(k.startswith("transformer.") for k in wa)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    mp.start_processes(_worker, args=(2, _free_port(), str(cut), {**sharded, "max_steps": 2}), nprocs=2,
                       start_method="spawn")
    mp.start_processes(_resume_worker, args=(2, _free_port(), str(cut), sharded), nprocs=2, start_method="spawn")
    torch.testing.assert_close(torch.tensor(_losses(cut)), torch.tensor(_losses(fsdp)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # five spawned processes
def test_sharded_async_checkpoints_resume_on_one_and_consolidate(tmp_path):
    """checkpoint_format: sharded (every rank writes its shards, asynchronously): saved by 2 FSDP processes at step
    2, continued by 1 plain process with the same next losses; `rectflow convert` consolidates the 2-process and the
    1-process shards into the same weights."""
    from rectflow.cli import main
    sharded = {**CFG, "parallel": "fsdp", "checkpoint_every": 2, "lr_schedule": "constant",
               "checkpoint_format": "sharded"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    mp.start_processes(_worker, args=(2, _free_port(), str(whole), sharded), nprocs=2, start_method="spawn")
    ck = find_checkpoint(whole)
    assert sorted(p.name for p in ck.iterdir()) == ["ema.dcp", "model.dcp", "state.pt"]
    assert len(list((ck / "model.dcp").glob("*.distcp"))) == 2
    mp.start_processes(_worker, args=(2, _free_port(), str(cut), {**sharded, "max_steps": 2}), nprocs=2,
                       start_method="spawn")
    mp.start_processes(_resume_worker, args=(1, _free_port(), str(cut), {**sharded, "parallel": "ddp"}), nprocs=1,
                       start_method="spawn")
    torch.testing.assert_close(torch.tensor(_losses(cut)), torch.tensor(_losses(whole)), rtol=1e-5, atol=1e-6)
    for run in (whole, cut):
        assert main(["convert", str(run), str(tmp_path / f"{run.name}.safetensors")]) == 0
    a, b = (load_file(tmp_path / f"{name}.safetensors") for name in ("whole", "cut"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # three spawned processes
def test_fsdp_trains_the_architecture_study_baselines(tmp_path):
    """A baseline under FSDP (UViT: its stream blocks are driven through their methods, so they stay in the root's
    unit) gives the losses of one process."""
    cfg = {**CFG, "arch": "uvit", "depth": 2}
    mp.start_processes(_worker, args=(1, _free_port(), str(tmp_path / "one"), cfg), nprocs=1, start_method="spawn")
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "two"), {**cfg, "parallel": "fsdp"}), nprocs=2,
                       start_method="spawn")
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-6)

"""Aspect-ratio buckets (rectflow.data.buckets), bucketed batches, and the sharded latent cache (training.cache):
keyed by data-set index and by what the latents depend on, damaged shards recomputed, exact resume after SIGKILL."""
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

from rectflow.autoencoder import SmallAE
from rectflow.data import get_dataset
from rectflow.data.buckets import bucket_sides, fit_bucket, nearest_bucket
from rectflow.runs import find_checkpoint
from rectflow.training.data import bucket_step_indices
from test_train import kill_after_checkpoint, losses, tiny

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"wide": (48, 24), "tall": (20, 40), "square": (30, 30), "panorama": (90, 30)}


def test_bucket_sides_keep_the_pixel_budget_and_the_grid():
    sides = bucket_sides(1024, 16)
    assert (1024, 1024) in sides and sides == sorted(sides, key=lambda s: s[0] / s[1])
    for w, h in sides:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 ** 2 and w * h > 0.9 * 1024 ** 2
        assert 1 / 2 <= w / h <= 2
    assert sides[0][0] < sides[0][1] and sides[-1][0] > sides[-1][1]  # tallest first, widest last
    assert bucket_sides(1024, 16, max_ratio=1.0) == [(1024, 1024)]
    assert nearest_bucket(1920, 1080, sides) == min(range(len(sides)), key=lambda i: abs(
        math.log(sides[i][0] / sides[i][1]) - math.log(1920 / 1080)))
    assert fit_bucket(Image.new("RGB", (300, 100)), (64, 32)).size == (64, 32)
    with pytest.raises(ValueError, match="smaller than the bucket side multiple"):
        bucket_sides(8, 16)


def folder(tmp_path: Path, copies: int = 3) -> Path:
    """Captioned images of four aspect ratios, `copies` of each, plus a val image per shape."""
    root = tmp_path / "photos"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for name, size in SIZES.items():
            for j in range(copies if split == "train" else 1):
                colour = (40 * j % 255, 100, 200 if name == "wide" else 50)
                Image.new("RGB", size, colour).save(root / split / f"{name}{j}.png")
                (root / split / f"{name}{j}.txt").write_text(f"a {name} picture number {j}")
    return root


def test_folder_items_take_their_bucket_shape(tmp_path):
    ds = get_dataset(str(folder(tmp_path)), 32, buckets=8)
    assert ds.bucket_sides == bucket_sides(32, 8)
    for i in range(len(ds)):
        w, h = ds.bucket_sides[ds.bucket_of[i]]
        assert ds[i]["image"].shape == (3, h, w)
    shapes = {ds.paths[i].stem[:-1]: ds.bucket_sides[ds.bucket_of[i]] for i in range(len(ds))}
    assert shapes["wide"][0] > shapes["wide"][1] and shapes["tall"][0] < shapes["tall"][1]
    assert shapes["square"] == (32, 32) and shapes["panorama"] == bucket_sides(32, 8)[-1]  # clamped at 2:1


def test_bucketed_batches_stay_in_one_bucket_and_cover_each_epoch():
    groups = [[0, 3, 5], [1, 2, 4, 6, 7, 8, 9], [10]]
    per_epoch = 1 + 3 + 1  # ceil(3/3) + ceil(7/3) + ceil(1/3)
    seen = []
    for step in range(per_epoch):
        batch = bucket_step_indices(0, step, 3, groups)
        assert len(batch) == 3 and any(set(batch) <= set(g) for g in groups)
        seen += batch
    assert set(seen) == set(range(11))
    assert bucket_step_indices(0, 7, 3, groups) == bucket_step_indices(0, 7, 3, groups)  # a pure function
    assert [bucket_step_indices(0, s, 3, groups) for s in range(5)] != [
        bucket_step_indices(1, s, 3, groups) for s in range(5)]


def bucket_cfg(tmp_path, ae_path, **kw):
    return tiny(**{"data": str(folder(tmp_path)), "buckets": True, "autoencoder": f"small:{ae_path}",
                   "patch_size": 2, "resolution": 32, "batch_size": 2, "max_steps": 4, "checkpoint_every": 2,
                   "data_options": {}, "cache_dir": str(tmp_path / "cache"), **kw})


def small_ae(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    SmallAE(channels=4, factor=2, width=8).save(path)
    return path


@pytest.mark.slow  # four trainers over the cache
def test_bucketed_cached_training_and_cache_keys(tmp_path):
    from rectflow.training.loop import Trainer
    ae = small_ae(tmp_path / "ae.safetensors")
    cfg = bucket_cfg(tmp_path, ae)
    trainer = Trainer(cfg, tmp_path / "run")
    cache = trainer.batches.cache
    shapes = {tuple(cache.get([i]).shape[1:]) for i in range(len(trainer.dataset))}
    assert len(shapes) == 3  # wide, tall, square latents
    for i in range(len(trainer.dataset)):  # keyed by data-set index: item i's own latent
        want = trainer.autoencoder.encode(trainer.dataset[i]["image"][None]).float()
        torch.testing.assert_close(cache.get([i]), want)
    trainer.fit()
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
    first = cache.dir
    # the same data, autoencoder and resolution: the same cache, not rebuilt
    again = Trainer(cfg, tmp_path / "run2").batches.cache
    assert again.dir == first and again.missing() == []
    # a damaged shard is recomputed, to the same values
    shard = first / "shard_00000.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    rebuilt = Trainer(cfg, tmp_path / "run3").batches.cache
    assert rebuilt.dir == first and shard.read_bytes() == good
    # another encoder (new weights at the same path) or resolution: another cache
    small_ae(ae, seed=1)
    assert Trainer(cfg, tmp_path / "run4").batches.cache.dir != first
    other = Trainer(bucket_cfg(tmp_path / "b", small_ae(tmp_path / "ae2.safetensors"), resolution=24),
                    tmp_path / "run5").batches.cache
    assert other.dir.name != first.name
    assert json.loads((other.dir / "identity.json").read_text())["resolution"] == 24


def test_buckets_need_a_folder(tmp_path, capsys):
    from rectflow.cli import main
    assert main(["train", "--data", "shapes", "--buckets", "--max-steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "does not take buckets (folders of images do)" in capsys.readouterr().err


@pytest.mark.slow  # CLI subprocesses, one killed
def test_bucketed_cached_run_resumes_bit_exact_after_sigkill(tmp_path):
    ae = small_ae(tmp_path / "ae.safetensors")
    data = folder(tmp_path, copies=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(run, resume=False):
        return [sys.executable, "-m", "rectflow.cli", "train", "--out", str(run), "--data", str(data), "--buckets",
                "--autoencoder", f"small:{ae}", "--patch-size", "2", "--resolution", "32", "--batch-size", "2",
                "--max-steps", "30", "--checkpoint-every", "3", "--sample-every", "0", "--depth", "2", "--hidden",
                "32", "--heads", "2", "--warmup-steps", "2", *(["--resume"] if resume else [])]
    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    run = tmp_path / "killed"
    kill_after_checkpoint(cmd(run), run, env)
    assert len(losses(run)) < 30, "the run finished before it was killed"
    subprocess.run(cmd(run, resume=True), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    assert losses(run) == losses(tmp_path / "ref")
    from safetensors.torch import load_file
    a, b = (load_file(find_checkpoint(r) / "ema.safetensors") for r in (tmp_path / "ref", run))
    assert all(torch.equal(a[k], b[k]) for k in a)

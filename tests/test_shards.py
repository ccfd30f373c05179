"""WebDataset-style shards: `rectflow shards` writes what WebDataset reads, streams cover an epoch once and resume
at their position, damage is skipped and counted, and a streaming run killed with SIGKILL resumes with the samples
(and losses) of an uninterrupted one."""
from __future__ import annotations

import dataclasses
import io
import math
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from rectflow.cli import main
from rectflow.data import get_dataset
from rectflow.data.shards import (Position, ShardError, ShardSet, dataset_samples, expand_braces, is_shard_spec,
                                  iter_tar, verify, write_shards)

ROOT = Path(__file__).resolve().parents[1]


def _shapes_shards(folder: Path, n: int = 48, shard_size: int = 8) -> dict:
    return write_shards(dataset_samples(get_dataset("shapes", 16, seed=0), n), folder, shard_size, source="shapes")


def _keys(stream, n: int) -> list[str]:
    it = iter(stream)
    return [next(it)["meta"]["key"] for _ in range(n)]


def test_webdataset_reads_the_shards(tmp_path):
    """The reference reader of the format (webdataset) sees every sample with its caption, image and json."""
    wds = pytest.importorskip("webdataset")
    manifest = _shapes_shards(tmp_path, n=20, shard_size=8)
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 4] and manifest["samples"] == 20
    ds = get_dataset("shapes", 16, seed=0)
    got = list(wds.WebDataset(str(tmp_path / "shard-{000000..000002}.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in got] == [f"{i:08d}" for i in range(20)]
    for i in (0, 13):
        assert got[i]["txt"] == ds[i]["caption"] == got[i]["json"]["caption"]
        assert got[i]["png"].size == (16, 16) and got[i]["json"]["width"] == 16
    assert verify(tmp_path) == []
    with open(tmp_path / "shard-000001.tar", "r+b") as f:  # one flipped byte: the hash no longer matches
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 1]))
    assert len(verify(tmp_path)) == 1 and "shard-000001.tar" in verify(tmp_path)[0]


def test_specs_and_brace_patterns(tmp_path):
    _shapes_shards(tmp_path, n=16)
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert is_shard_spec(str(tmp_path)) and is_shard_spec("s3://bucket/x-{000..009}.tar")
    assert not is_shard_spec("shapes")
    pattern = ShardSet(str(tmp_path / "shard-{000000..000001}.tar"), 16)
    assert pattern.urls == ShardSet(str(tmp_path), 16).urls and len(ShardSet(str(tmp_path), 16)) == 16
    with pytest.raises(ShardError, match="no shards"):
        ShardSet(str(tmp_path / "val"), 16)


def test_streams_cover_each_epoch_once_and_resume_at_their_position(tmp_path):
    """Three streams read disjoint shards; an epoch is every sample once (shuffled); a stream rebuilt at a saved
    position yields exactly what the original yields next, across the epoch boundary."""
    _shapes_shards(tmp_path, n=48, shard_size=8)  # 6 shards, 2 per stream
    shards = ShardSet(str(tmp_path), 16, seed=3, shuffle_buffer=5)
    epoch = [_keys(shards.stream(i, 3), 16) for i in range(3)]
    flat = [k for keys in epoch for k in keys]
    assert sorted(flat) == [f"{i:08d}" for i in range(48)]
    assert flat[:16] != sorted(flat[:16])  # shuffled
    stream = shards.stream(1, 3)
    it = iter(stream)
    _ = [next(it) for _ in range(11)]
    saved = Position(**stream.position.to_dict())
    assert (saved.epoch, saved.drawn) == (0, 11)
    rest = [next(it)["meta"]["key"] for _ in range(12)]  # 5 of epoch 0, 7 of epoch 1
    assert _keys(shards.stream(1, 3, saved), 12) == rest
    assert len(set(rest[5:])) == 7  # epoch 1: a new shard order over the streams, each sample once
    with pytest.raises(ShardError, match="6 shards for 7 streams"):
        shards.stream(0, 7)


def test_damaged_samples_and_shards_are_skipped_and_counted(tmp_path):
    """A sample whose image is garbage and a truncated shard: skipped, counted in the position, never fatal; a
    resumed stream keeps the counts."""
    _shapes_shards(tmp_path, n=16, shard_size=8)
    bad = tmp_path / "shard-000000.tar"
    members = [(m.name, tarfile.open(bad).extractfile(m).read()) for m in tarfile.open(bad)]
    with tarfile.open(bad, "w") as tar:
        for name, data in members:
            data = b"not a png" if name == "00000003.png" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:3000])  # truncated mid-shard
    shards = ShardSet(str(tmp_path), 16, shuffle_buffer=0)
    stream = shards.stream(0, 1)
    it = iter(stream)
    keys = [next(it)["meta"]["key"] for _ in range(7)]
    assert "00000003" not in keys and stream.position.bad_samples == 1
    more = [next(it)["meta"]["key"] for _ in range(3)]  # the truncated shard's readable head, then the next epoch
    assert stream.position.bad_shards == 1 and set(more) <= {f"{i:08d}" for i in range(16)}
    saved = Position(**stream.position.to_dict())
    resumed = shards.stream(0, 1, saved)
    assert _keys(resumed, 5) == [next(it)["meta"]["key"] for _ in range(5)]
    assert resumed.position.bad_samples == stream.position.bad_samples >= 1


def test_rectflow_shards_packs_a_folder_byte_for_byte(tmp_path, capsys):
    """A folder's JPEGs are stored as they are (with captions, sizes and the validation split of training);
    broken files are left out; --check verifies; the result trains as a data set."""
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 80, 200)).save(src / f"img{i}.jpg", quality=90)
        (src / f"img{i}.txt").write_text(f"picture {i}")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "shards"
    assert main(["shards", str(src), str(out), "--shard-size", "2", "--val-every", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 4 and len(manifest["shards"]) == 2 and (out / "preview.png").is_file()
    assert json.loads((out / "val" / "manifest.json").read_text())["samples"] == 2
    records = dict(iter_tar(str(out / "shard-000000.tar")))
    first = records["00000000"]
    info = json.loads(first["json"])
    assert first["jpg"] == (src / info["source"]).read_bytes() and first["txt"].decode() == "picture 0"
    assert (info["width"], info["height"]) == (40, 30)
    assert main(["shards", "--check", str(out)]) == 0
    assert main(["shards", str(src), str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    val = get_dataset(str(out), 16, split="val")
    assert len(val) == 2 and val[0]["caption"].startswith("picture")
    (out / "shard-000001.tar").write_bytes(b"")
    assert main(["shards", "--check", str(out)]) == 1


def _train_cmd(run: Path, data: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "rectflow.cli", "train", "--data", str(data), "--out", str(run),
           "--resolution", "16", "--patch-size", "4", "--depth", "1", "--hidden", "64", "--heads", "2",
           "--batch-size", "8", "--warmup-steps", "2", "--log-every", "1", "--max-steps", str(steps),
           "--checkpoint-every", "3", "--sample-every", "0", "--set", "workers=2", "--set", "log_samples=true",
           "--set", "data_options.shuffle_buffer=4"]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow  # three CLI subprocesses with DataLoader workers, one killed
def test_streaming_run_resumes_after_sigkill_without_repeating_or_skipping(tmp_path):
    """Two workers stream 12 shards; killed after a checkpoint and resumed, the run reads exactly the samples of
    an uninterrupted run, step by step (so every sample once per epoch), with the same losses."""
    from tests.test_train import kill_after_checkpoint, losses

    data = tmp_path / "data"
    _shapes_shards(data, n=96, shard_size=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 30
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, data, steps), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    run = tmp_path / "killed"
    kill_after_checkpoint(_train_cmd(run, data, steps), run, env, step=9)
    assert len(losses(run)) < steps, "the run finished before it was killed"
    subprocess.run(_train_cmd(run, data, steps, resume=True), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    def samples(r):
        return [json.loads(line)["samples"] for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert samples(run) == samples(ref)
    first_epoch = [k for step in samples(ref)[:12] for k in step]
    assert sorted(first_epoch) == [f"{i:08d}" for i in range(96)]
    assert losses(run) == losses(ref)
    state = torch.load(run / "checkpoints" / "step_00000030" / "state.pt", weights_only=True)
    assert state["data_streams"]["layout"] == 2 and set(state["data_streams"]["streams"]) == {"0", "1"}


def test_rectflow_cache_precomputes_latents_and_text_that_training_streams(tmp_path, capsys):
    """`rectflow cache` writes each sample's latent and text features (np.load reads them, the autoencoder's and
    text encoder's outputs); training on them needs no image decoding and no text encoding (the encoders are
    released) and learns like training on the images; a mismatched autoencoder is refused by name."""
    import numpy as np

    from rectflow.autoencoder import SmallAE, load_autoencoder
    from rectflow.data.shards import LATENT
    from rectflow.text import load_text_encoder
    from rectflow.training.loop import Trainer
    from tests.test_train import losses, tiny
    torch.manual_seed(0)
    SmallAE(channels=4, factor=2, width=8).save(tmp_path / "ae.safetensors")
    ae_spec = f"small:{tmp_path / 'ae.safetensors'}"
    out = tmp_path / "cached"
    assert main(["cache", "--data", "shapes", "--count", "32", "--autoencoder", ae_spec, "--text-encoder", "minilm",
                 "--resolution", "16", "--shard-size", "8", "--out", str(out),
                 "--batch", "5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 32 and len(manifest["shards"]) == 4 and manifest["cache"]["resolution"] == 16
    first = dict(iter_tar(str(out / "shard-000000.tar")))["00000000"]
    latent = np.load(io.BytesIO(first[LATENT]))
    item = get_dataset("shapes", 16, seed=0)[0]
    ae = load_autoencoder(ae_spec)
    want = ae.encode(item["image"][None]).float()[0]
    torch.testing.assert_close(torch.from_numpy(latent).float(), want, rtol=2e-3, atol=2e-3)  # float16 storage
    context = np.load(io.BytesIO(first["context.npy"]))
    want = load_text_encoder("minilm").encode([item["caption"]])[0][0].float()
    torch.testing.assert_close(torch.from_numpy(context).float(), want, rtol=2e-3, atol=2e-3)
    cfg = tiny(data=str(out), autoencoder=ae_spec, text_encoder="minilm", max_steps=4, release_encoders=True,
               patch_size=2, val_every=4, val_size=4, data_options={})
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.text.encoder is None
    run = trainer.fit()
    assert len(losses(run)) == 4 and all(math.isfinite(x) for x in losses(run))
    assert "val_loss" in (run / "metrics.jsonl").read_text().splitlines()[-1]
    bad = main(["train", "--data", str(out), "--autoencoder", "identity", "--text-encoder", "minilm", "--resolution",
                "16", "--max-steps", "1", "--out", str(tmp_path / "bad")])
    assert bad == 2 and "precomputed with autoencoder" in capsys.readouterr().err


@pytest.mark.slow  # DataLoader worker processes
def test_resume_with_another_stream_layout_starts_the_next_epoch(tmp_path, capsys):
    """Saved by a run without workers (1 stream), resumed with 2 workers (2 streams): the old stream cannot be
    continued, so the new ones start at the next epoch, and the run says so."""
    from rectflow.train import train
    from tests.test_train import tiny
    _shapes_shards(tmp_path / "data", n=32, shard_size=8)
    cfg = tiny(data=str(tmp_path / "data"), data_options={"shuffle_buffer": 4}, max_steps=2, log_samples=True)
    train(cfg, tmp_path / "run")
    train(dataclasses.replace(cfg, max_steps=4, workers=2), tmp_path / "run", resume=True)
    assert "data streams were 1 (processes x workers), this run has 2" in capsys.readouterr().err
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert state["data_streams"]["layout"] == 2
    assert {p["epoch"] for p in state["data_streams"]["streams"].values()} == {1}


def test_a_tar_cut_at_a_member_boundary_and_an_unreadable_stream(tmp_path):
    """tarfile reads a tar cut between members as a clean end: the manifest's count catches it (counted as a
    damaged shard, its possibly partial last sample held back); a stream whose every shard is unreadable stops with
    a clear error after a few epochs instead of spinning."""
    _shapes_shards(tmp_path / "a", n=8, shard_size=8)
    tar = tmp_path / "a" / "shard-000000.tar"
    members = [(m.name, tarfile.open(tar).extractfile(m).read()) for m in tarfile.open(tar)]
    with tarfile.open(tar, "w") as out:
        for name, data in members[:3 * 5 - 1]:  # 5 samples of 3 members, the 5th missing its last member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    stream = ShardSet(str(tmp_path / "a"), 16, shuffle_buffer=0).stream(0, 1)
    it = iter(stream)
    keys = [next(it)["meta"]["key"] for _ in range(4)]
    assert keys == [f"{i:08d}" for i in range(4)] and stream.position.bad_shards == 0
    assert next(it)["meta"]["key"] == "00000000"  # the next epoch: sample 4 was held back, the shard counted
    assert stream.position.bad_shards == 1
    _shapes_shards(tmp_path / "b", n=8, shard_size=8)
    (tmp_path / "b" / "shard-000000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ShardError, match="no usable sample in 3 epochs"):
        next(iter(ShardSet(str(tmp_path / "b"), 16).stream(0, 1)))

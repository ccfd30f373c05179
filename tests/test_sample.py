"""`rectflow sample`: runs and weights files, prompts, seeds, grids with metadata, encoder subsets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from rectflow.cli import main
from rectflow.config import TrainConfig
from rectflow.sample import generate, load_pipeline, make_grid, read_metadata
from rectflow.train import find_checkpoint, train

TINY = {"resolution": 16, "patch_size": 4, "depth": 1, "hidden": 64, "heads": 2, "batch_size": 8, "max_steps": 3,
        "warmup_steps": 1, "sample_every": 0, "checkpoint_every": 0,
        "data_options": {"categories": ["single_object"]}, "shift": 2.0}
FAST = ["--steps", "3", "--cfg-scale", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (3 steps)."""
    run = tmp_path_factory.mktemp("sample") / "run"
    train(TrainConfig.from_dict(TINY), run)
    return run


def test_sample_run_writes_grid_singles_and_metadata(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(run_dir), "--prompt", "a red circle", "--prompt", "two blue squares",
                 "--out", str(out), "--seed", "5", *FAST]) == 0
    grid = Image.open(out)
    meta = json.loads(grid.text["rectflow"])
    assert json.loads(grid.text["prompts"]) == ["a red circle", "two blue squares"]
    assert meta["steps"] == 3 and meta["cfg_scale"] == 2.0 and meta["seed"] == 5 and meta["weights"] == "ema"
    assert meta["shift"] == 2.0  # the run's training shift by default
    singles = sorted(tmp_path.glob("grid_*.png"))
    assert [p.name for p in singles] == ["grid_000.png", "grid_001.png"]
    one = Image.open(singles[1])
    assert one.size == (16, 16) and one.text["prompt"] == "two blue squares"
    assert json.loads(one.text["rectflow"])["seed"] == 6  # image i uses seed + i
    assert grid.size[0] > 128 and grid.size[1] > 128  # tiles are scaled up and captioned


def test_prompts_file_checkpoint_file_and_raw_weights(run_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\nthree green triangles\n")
    ck = find_checkpoint(run_dir)
    out = tmp_path / "c.png"
    assert main(["sample", "--checkpoint", str(ck / "model.safetensors"), "--prompts-file", str(prompts),
                 "--out", str(out), *FAST]) == 0
    assert json.loads(Image.open(out).text["prompts"]) == ["a red circle", "three green triangles"]
    meta = read_metadata(ck / "ema.safetensors")
    assert json.loads(meta["rectflow.train_config"])["depth"] == 1
    # raw and EMA weights differ after 3 steps, so their images differ
    raw = load_pipeline(run=str(run_dir), weights="raw")
    ema = load_pipeline(run=str(run_dir), weights="ema")
    a = generate(raw, ["a red circle"], steps=3)
    b = generate(ema, ["a red circle"], steps=3)
    assert not torch.equal(a, b)


def test_seed_and_batch_size(run_dir):
    pipe = load_pipeline(run=str(run_dir))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    a = generate(pipe, prompts, steps=3, seed=1, batch_size=3)
    b = generate(pipe, prompts, steps=3, seed=1, batch_size=1)
    c = generate(pipe, prompts, steps=3, seed=2, batch_size=3)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # noise is per image, not per batch
    assert (a - c).abs().max() > 0.05
    # image i of seed s is image 0 of seed s + i
    d = generate(pipe, prompts[1:2], steps=3, seed=2)
    torch.testing.assert_close(a[1:2], d, atol=1e-4, rtol=0)


def test_solvers_and_guidance_change_the_output(run_dir):
    pipe = load_pipeline(run=str(run_dir))
    base = generate(pipe, ["a red circle"], steps=3, cfg_scale=1.0)
    for kw in ({"solver": "heun"}, {"solver": "dpmpp_2m"}, {"cfg_scale": 5.0}, {"shift": 3.0},
               {"schedule": "sd3"}):
        assert not torch.equal(base, generate(pipe, ["a red circle"], steps=3, cfg_scale=kw.pop("cfg_scale", 1.0),
                                              **kw)), kw


def test_encoder_subset(run_dir):
    pipe = load_pipeline(run=str(run_dir))
    names = list(pipe.text_encoder.encoder_names)
    full = generate(pipe, ["a red circle"], steps=3, cfg_scale=1.0)
    same = generate(pipe, ["a red circle"], steps=3, cfg_scale=1.0, encoders=names)
    assert torch.equal(full, same)
    none = generate(pipe, ["a red circle"], steps=3, cfg_scale=1.0, encoders=[])
    other = generate(pipe, ["a blue square"], steps=3, cfg_scale=1.0, encoders=[])
    assert torch.equal(none, other)  # no encoder: the prompt cannot matter
    with pytest.raises(ValueError, match="'t5'"):
        generate(pipe, ["a red circle"], steps=3, encoders=["t5"])


def test_errors_name_the_problem(run_dir, tmp_path, capsys):
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["sample", "--prompt", "a"]) == 2
    assert "exactly one of --run" in capsys.readouterr().err


def test_make_grid_layout():
    imgs = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green", "black", "white")]
    grid = make_grid(imgs, ["a long caption that needs wrapping over lines"] * 5, tile=64)
    assert grid.size[0] == 3 * (64 + 4) + 4  # ceil(sqrt(5)) = 3 columns
    assert grid.getpixel((4 + 10, 4 + 10)) == (255, 0, 0)


def test_a_trained_dit_samples_through_the_cli(tmp_path):
    """A baseline (arch: dit) trained for 2 steps loads from --run and --checkpoint by its stored "arch"."""
    from safetensors.torch import load_file

    from rectflow.models.baselines import DiT
    run = tmp_path / "dit"
    train(TrainConfig.from_dict({**TINY, "arch": "dit", "max_steps": 2}), run)
    ck = find_checkpoint(run)
    assert json.loads(read_metadata(ck / "ema.safetensors")["config"])["arch"] == "dit"
    pipe = load_pipeline(run=str(run))
    assert isinstance(pipe.model, DiT)
    stored = load_file(ck / "ema.safetensors")
    assert all(torch.equal(v, stored[k]) for k, v in pipe.model.state_dict().items())
    outs = [tmp_path / "run.png", tmp_path / "ck.png"]
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--out", str(outs[0]), *FAST]) == 0
    assert main(["sample", "--checkpoint", str(ck / "ema.safetensors"), "--prompt", "a red circle",
                 "--out", str(outs[1]), *FAST]) == 0
    singles = [Image.open(p.with_name(f"{p.stem}_000.png")) for p in outs]
    assert singles[0].size == (16, 16) and singles[0].tobytes() == singles[1].tobytes()


# ---------------------------------------------------------------- classifier-free guidance's unconditional branch


class HashText(torch.nn.Module):
    """A text encoder whose features are a pure function of the caption (no weights to load)."""

    context_dim = pooled_dim = 8
    seq_len = 4
    encoder_names = ("hash",)

    def __init__(self):
        super().__init__()
        from rectflow.text import Part
        self.parts = {"hash": Part(slice(None), slice(None), slice(None))}

    def encode(self, captions):
        import zlib
        gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
        context = torch.stack([torch.randn(self.seq_len, self.context_dim, generator=g) for g in gens])
        return context, context.mean(1) + 1


class RecordingModel(torch.nn.Module):
    """Zero output; records the context and pooled inputs of every call."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, context, y):
        self.calls.append((context.clone(), y.clone()))
        return torch.zeros_like(x)


def _tiny_pipeline(uncond_prompt=None):
    from rectflow.autoencoder import Identity
    from rectflow.flow import Formulation
    from rectflow.sample import Pipeline
    return Pipeline(RecordingModel(), Formulation.from_name("rf"), HashText(), Identity(), 4,
                    uncond_prompt=uncond_prompt)


def test_uncond_branch_is_zeros_the_empty_prompt_or_the_negative_prompt():
    prompts = ["a red circle", "two blue squares"]
    text = HashText()
    for uncond_prompt, negative, expected in ((None, None, None), ("", None, ""), (None, "blurry", "blurry"),
                                               ("", "blurry", "blurry")):
        pipe = _tiny_pipeline(uncond_prompt)
        generate(pipe, prompts, steps=1, cfg_scale=3.0, negative_prompt=negative)
        (context, pooled), = pipe.model.calls
        cond = text.encode(prompts)
        torch.testing.assert_close(context[:2], cond[0])
        torch.testing.assert_close(pooled[:2], cond[1])
        if expected is None:  # rectflow runs: dropout to zeros
            assert not context[2:].any() and not pooled[2:].any()
        else:
            u_context, u_pooled = text.encode([expected] * 2)
            torch.testing.assert_close(context[2:], u_context)
            torch.testing.assert_close(pooled[2:], u_pooled)
    pipe = _tiny_pipeline("")
    generate(pipe, prompts, steps=1, cfg_scale=3.0, encoders=[])  # no encoder kept: the uncond is zeros too
    assert not pipe.model.calls[0][0].any() and not pipe.model.calls[0][1].any()


def test_released_files_use_the_empty_prompt_and_runs_zeros(run_dir, tmp_path):
    from rectflow.checkpoints import save_released
    from rectflow.models.mmdit import MMDiT
    assert load_pipeline(run=str(run_dir)).uncond_prompt is None
    torch.manual_seed(0)
    released = tmp_path / "released.safetensors"
    save_released(MMDiT.from_depth(1, patch_size=4, in_channels=3, context_dim=384, pooled_dim=384, input_size=16,
                                   hidden_size=64, num_heads=2, pos_embed_max_size=4), released)
    pipe = load_pipeline(checkpoint=str(released), text_encoder="minilm", autoencoder="identity")
    assert pipe.uncond_prompt == "" and pipe.weights is None and not pipe.train_config


def test_negative_prompt_through_the_cli(run_dir, tmp_path):
    outs = {}
    for name, extra in (("zeros", []), ("neg", ["--negative-prompt", "a green triangle"])):
        outs[name] = tmp_path / f"{name}.png"
        assert main(["sample", "--run", str(run_dir), "--prompt", "a red circle", "--out", str(outs[name]),
                     *FAST, *extra]) == 0
    metas = {k: json.loads(Image.open(p).text["rectflow"]) for k, p in outs.items()}
    assert metas["zeros"]["negative_prompt"] is None and metas["neg"]["negative_prompt"] == "a green triangle"
    pipe = load_pipeline(run=str(run_dir))
    base = generate(pipe, ["a red circle"], steps=3, cfg_scale=5.0)
    assert not torch.equal(base, generate(pipe, ["a red circle"], steps=3, cfg_scale=5.0,
                                          negative_prompt="a green triangle"))


# ---------------------------------------------------------------- which weights are loaded


def test_requested_weights_must_exist_and_metadata_names_the_file(run_dir, tmp_path, capsys):
    import shutil
    ck = find_checkpoint(run_dir)
    only_raw = tmp_path / "only_raw"
    only_raw.mkdir()
    shutil.copy(ck / "model.safetensors", only_raw / "model.safetensors")
    out = tmp_path / "x.png"
    # asked for EMA weights that are not there: an error, not the raw weights labelled as EMA
    assert main(["sample", "--checkpoint", str(only_raw), "--weights", "ema", "--prompt", "a", "--out", str(out),
                 *FAST]) == 2
    assert "no ema.safetensors" in capsys.readouterr().err and not out.exists()
    # no --weights: the directory's one file, recorded as what it is
    assert main(["sample", "--checkpoint", str(only_raw), "--prompt", "a", "--out", str(out), *FAST]) == 0
    meta = json.loads(Image.open(out).text["rectflow"])
    assert meta["weights"] == "raw" and meta["source"] == str(only_raw / "model.safetensors")
    assert main(["sample", "--checkpoint", str(ck), "--weights", "raw", "--prompt", "a", "--out", str(out),
                 *FAST]) == 0
    meta = json.loads(Image.open(out).text["rectflow"])
    assert meta["weights"] == "raw" and meta["source"] == str(ck / "model.safetensors")
    assert main(["sample", "--run", str(run_dir), "--prompt", "a", "--out", str(out), *FAST]) == 0
    meta = json.loads(Image.open(out).text["rectflow"])
    assert meta["weights"] == "ema" and meta["source"] == str(ck / "ema.safetensors")
    # --weights with a single file would be ignored: refused
    assert main(["sample", "--checkpoint", str(ck / "model.safetensors"), "--weights", "ema", "--prompt", "a",
                 "--out", str(out), *FAST]) == 2
    assert "single weights file" in capsys.readouterr().err

"""Fine-tuning released-layout models (rectflow.training.finetune): `train --init` with a LoRA or all weights, the
run's LoRA loaded by diffusers' StableDiffusion3Pipeline giving rectflow's image, exact resume, the errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tiny_sd3
from rectflow import lora as L
from rectflow.cli import main
from rectflow.runs import WEIGHT_FILES, find_checkpoint
from rectflow.sample import generate, load_pipeline

pytest.importorskip("peft")
pytest.importorskip("diffusers")
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3(request, tmp_path_factory):
    return tiny_sd3.build(tmp_path_factory.mktemp(request.param), request.param)


def train(tiny, out, *extra) -> int:
    """`rectflow train --init` on the tiny model: shapes at 32 px, batch 2, a high lr so 3 steps change the model."""
    return main(["train", "--init", str(tiny.released), "--text-encoder", tiny.text_encoder, "--autoencoder",
                 tiny.autoencoder, "--data", "shapes", "--resolution", str(tiny_sd3.RESOLUTION), "--batch-size", "2",
                 "--lr", "3e-2", "--warmup-steps", "0", "--sample-every", "0", "--checkpoint-every", "2",
                 "--out", str(out), *extra])


def lora_run(tiny, out, steps=3, *extra) -> int:
    return train(tiny, out, "--lora", "4", "--lora-alpha", "8", "--lora-targets", "all-linear", "--max-steps",
                 str(steps), *extra)


def images(tiny, **kw) -> torch.Tensor:
    pipe = load_pipeline(text_encoder=tiny.text_encoder, autoencoder=tiny.autoencoder,
                         resolution=tiny_sd3.RESOLUTION, **kw)
    return generate(pipe, PROMPTS, steps=4, cfg_scale=4.0, shift=3.0, schedule="sd3", seed=0)


def test_a_trained_lora_loads_in_diffusers_and_gives_rectflow_s_image(sd3, tmp_path):
    assert lora_run(sd3, tmp_path / "run") == 0
    lora_file = find_checkpoint(tmp_path / "run") / WEIGHT_FILES["raw"]
    ours = images(sd3, checkpoint=str(sd3.released), loras=[str(lora_file)])
    base = images(sd3, checkpoint=str(sd3.released))
    assert (ours - base).abs().max() > 1e-2  # the LoRA learned something visible

    pipe = tiny_sd3.diffusers_pipeline(sd3)
    pipe.load_lora_weights(str(lora_file))
    side = ours.shape[-1] // 2  # the tiny VAE halves
    noise = torch.stack([torch.randn((16, side, side), generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=[""] * 2, latents=noise, num_inference_steps=4, guidance_scale=4.0,
                      height=2 * side, width=2 * side, max_sequence_length=77, output_type="pt").images
    assert (ours - (theirs * 2 - 1)).abs().max() <= 1e-4

    # the run itself samples as base + its LoRA; its files say what they are
    torch.testing.assert_close(images(sd3, run=str(tmp_path / "run"), weights="raw"), ours, atol=1e-5, rtol=0)
    with safe_open(str(lora_file), "pt") as f:
        meta = f.metadata()
    assert meta[L.BASE_KEY] == str(sd3.released.resolve()) and json.loads(meta["rectflow.uncond_prompt"]) == ""
    assert json.loads(meta["rectflow.train_config"])["lora"] == 4 and L.DIFFUSERS_METADATA in meta


def test_lora_run_resumes_exactly(sd3, tmp_path):
    constant = ("--lr-schedule", "constant")  # so that max_steps may grow on resume
    assert lora_run(sd3, tmp_path / "full", 4, *constant) == 0
    assert lora_run(sd3, tmp_path / "cut", 2, *constant) == 0
    assert lora_run(sd3, tmp_path / "cut", 4, *constant, "--resume") == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("full", "cut")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, _ = L.read_lora(find_checkpoint(tmp_path / "full") / WEIGHT_FILES["ema"])
    b, _ = L.read_lora(find_checkpoint(tmp_path / "cut") / WEIGHT_FILES["ema"])
    assert all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)


def test_full_fine_tune_from_a_released_file(sd3, tmp_path):
    assert train(sd3, tmp_path / "run", "--max-steps", "2", "--no-bf16") == 0
    ck = find_checkpoint(tmp_path / "run")
    with safe_open(str(ck / WEIGHT_FILES["raw"]), "pt") as f:
        meta = f.metadata()
        assert "joint_blocks.0.x_block.attn.qkv.weight" in f.keys()
    assert json.loads(meta["config"])["depth"] == tiny_sd3.TRANSFORMERS[sd3.kind]["depth"]  # the file's, not depth's
    tuned = images(sd3, run=str(tmp_path / "run"), weights="raw")
    base = images(sd3, checkpoint=str(sd3.released))
    assert (tuned - base).abs().max() > 1e-2
    # a LoRA on top of the fine-tuned run: init may name a run directory
    assert lora_run(sd3, tmp_path / "lora", 1, "--init", str(tmp_path / "run")) == 0


def test_fine_tuning_errors_name_the_problem(sd3, tmp_path, capsys):
    assert main(["train", "--lora", "4", "--out", str(tmp_path / "a")]) == 2
    assert "a LoRA adapts existing weights; set init" in capsys.readouterr().err
    assert main(["train", "--init", str(sd3.released), "--out", str(tmp_path / "b"), "--max-steps", "1"]) == 2
    assert "expects context/pooled widths 96/64" in capsys.readouterr().err  # MiniLM is the default encoder
    assert train(sd3, tmp_path / "c", "--lora", "2", "--lora-targets", "nothing", "--max-steps", "1") == 2
    assert "selects no linear layer" in capsys.readouterr().err
    assert main(["train", "--init", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "d")]) == 2
    assert "config key 'init'" in capsys.readouterr().err
    assert train(sd3, tmp_path / "e", "--lora", "2", "--no-bf16", "--frozen-dtype", "bf16") == 2
    assert "bf16 base weights need bf16 autocast" in capsys.readouterr().err


@pytest.mark.slow  # caches 1,316 emoji latents
def test_encoders_are_released_after_caching_and_grids_and_validation_still_work(sd3, tmp_path):
    from rectflow.training.loop import Trainer
    from rectflow.training.cli import add_arguments, config_from_args
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--init", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
                              sd3.autoencoder, "--data", "emoji", "--set", "data_options.subset=single",
                              "--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--lora", "2",
                              "--sample-every", "2", "--sample-steps", "2", "--val-every", "2", "--val-size", "4",
                              "--release-encoders", "--out", str(tmp_path / "run")])
    trainer = Trainer(config_from_args(args), tmp_path / "run")
    assert trainer.text.encoder is None and trainer.autoencoder.vae.encoder is None
    trainer.fit()
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(rec["val_loss_t"]) == 8 and rec["val_loss"] > 0
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    with pytest.raises(RuntimeError, match="text encoder was released"):
        trainer.text.encode(["a caption nobody prepared"])


def test_the_fine_tuning_recipe_loads(sd3, tmp_path):
    import argparse
    from rectflow.training.cli import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    recipe = str(tiny_sd3.ROOT / "configs" / "finetune-sd3.5-medium.yaml")
    cfg = config_from_args(parser.parse_args(["--config", recipe, "--init", str(sd3.released), "--out",
                                              str(tmp_path / "r")]))
    assert (cfg.lora, cfg.shift, cfg.resolution, cfg.buckets, cfg.lora_targets) == (16, 3.0, 1024, True, "attn")


@pytest.mark.slow  # five short training runs
def test_prior_preservation_draws_class_latents_once_and_resumes_exactly(sd3, tmp_path):
    extra = ("--class-prompt", "a blue circle", "--class-images", "3", "--cache-dir", str(tmp_path / "cache"),
             "--lr-schedule", "constant")
    assert lora_run(sd3, tmp_path / "full", 4, *extra) == 0
    cached = sorted((tmp_path / "cache").glob("class-*.safetensors"))
    assert len(cached) == 1 and (tmp_path / "full" / "class_images.png").is_file()
    mtime = cached[0].stat().st_mtime_ns
    assert lora_run(sd3, tmp_path / "cut", 2, *extra) == 0
    assert lora_run(sd3, tmp_path / "cut", 4, *extra, "--resume") == 0
    assert cached[0].stat().st_mtime_ns == mtime  # drawn once, reused by the other runs
    recs = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("full", "cut")]
    assert [r["loss"] for r in recs[0]] == [r["loss"] for r in recs[1]]
    assert [r["prior_loss"] for r in recs[0]] == [r["prior_loss"] for r in recs[1]] and recs[0][0]["prior_loss"] > 0
    # without prior preservation the same steps give other losses (the class batch is in the gradient)
    assert lora_run(sd3, tmp_path / "plain", 4, "--lr-schedule", "constant") == 0
    plain = [json.loads(x)["loss"] for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert plain[0] == recs[0][0]["loss"] and plain[1:] != [r["loss"] for r in recs[0][1:]]

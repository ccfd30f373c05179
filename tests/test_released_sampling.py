"""Released SD3 / SD3.5 sampling as people run it, against diffusers' StableDiffusion3Pipeline from the same latents on
tiny random pipelines: skip-layer guidance, and a run without T5."""
from __future__ import annotations

import pytest
import torch

import tiny_sd3
from rectflow.sample import generate, load_pipeline
from rectflow.sampling import SkipLayerGuidance

pytest.importorskip("diffusers")
PROMPTS = ["a red circle", "two blue squares"]
STEPS = 6


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3(request, tmp_path_factory):
    return tiny_sd3.build(tmp_path_factory.mktemp(request.param), request.param)


def ours(tiny, **kw):
    pipe = load_pipeline(checkpoint=str(tiny.released), text_encoder=tiny.text_encoder,
                         autoencoder=tiny.autoencoder, resolution=tiny_sd3.RESOLUTION)
    return generate(pipe, PROMPTS, steps=STEPS, cfg_scale=4.0, shift=3.0, schedule="sd3", seed=0, **kw)


def theirs(tiny, pipe=None, **kw):
    pipe = pipe or tiny_sd3.diffusers_pipeline(tiny)
    side = tiny_sd3.RESOLUTION // 2
    noise = torch.stack([torch.randn((16, side, side), generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        images = pipe(PROMPTS, negative_prompt=[""] * 2, latents=noise, num_inference_steps=STEPS, guidance_scale=4.0,
                      height=2 * side, width=2 * side, max_sequence_length=77, output_type="pt", **kw).images
    return images * 2 - 1


def test_skip_layer_guidance_matches_diffusers(sd3):
    slg = SkipLayerGuidance(layers=(1,), scale=2.8, start=0.01, stop=0.6)  # steps 1, 2, 3 of 6
    with_slg = ours(sd3, slg=slg)
    assert (with_slg - ours(sd3)).abs().max() > 1e-2  # it changes the image
    ref = theirs(sd3, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                 skip_layer_guidance_stop=0.6)
    assert (with_slg - ref).abs().max() <= 1e-4


def test_without_t5_matches_diffusers_without_its_third_encoder(sd3):
    no_t5 = ours(sd3, encoders=["clip_l", "clip_g"])
    assert (no_t5 - ours(sd3)).abs().max() > 1e-2
    pipe = tiny_sd3.diffusers_pipeline(sd3)
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    assert (no_t5 - theirs(sd3, pipe)).abs().max() <= 1e-4


def test_skip_layer_guidance_values_are_checked(sd3):
    with pytest.raises(ValueError, match="start <= stop"):
        SkipLayerGuidance(layers=(1,), start=0.5, stop=0.2)
    with pytest.raises(ValueError, match="joint blocks 0-"):
        ours(sd3, slg=SkipLayerGuidance(layers=(9,)))
    assert not SkipLayerGuidance((1,), start=0.01, stop=0.2).active(0, 28)
    assert [i for i in range(28) if SkipLayerGuidance((1,), start=0.01, stop=0.2).active(i, 28)] == [1, 2, 3, 4, 5]


def test_presets_are_recognised_and_resolve_as_documented(sd3, tmp_path):
    import argparse
    import json
    from PIL import Image
    from rectflow.cli import main
    from rectflow.presets import PRESETS, recognise
    from rectflow.sample import add_arguments, sampler_settings
    medium = dict(depth=24, hidden_size=1536, in_channels=16, qk_norm=None, dual_attention_layers=[])
    assert recognise(medium) == "sd3-medium"
    assert recognise({**medium, "qk_norm": "rms", "dual_attention_layers": list(range(13))}) == "sd3.5-medium"
    large = dict(depth=38, hidden_size=2432, in_channels=16, qk_norm="rms", dual_attention_layers=[])
    assert recognise(large, "sd3.5_large.safetensors") == "sd3.5-large"
    assert recognise(large, "models/sd3.5_large_turbo.safetensors") == "sd3.5-large-turbo"
    assert recognise(dict(medium, depth=2)) is None and recognise({**medium, "arch": "dit"}) is None
    # a preset by name, then a flag over it; the PNG says what was used
    common = ["sample", "--checkpoint", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
              sd3.autoencoder, "--resolution", "32", "--prompt", "a red circle"]
    assert main([*common, "--preset", "sd3.5-large-turbo", "--out", str(tmp_path / "t.png")]) == 0
    meta = json.loads(Image.open(tmp_path / "t_000.png").text["rectflow"])
    turbo = PRESETS["sd3.5-large-turbo"]
    assert (meta["steps"], meta["cfg_scale"], meta["solver"], meta["shift"], meta["preset"]) == (
        turbo["steps"], turbo["cfg_scale"], turbo["solver"], turbo["shift"], "sd3.5-large-turbo")
    assert main([*common, "--preset", "sd3.5-large-turbo", "--steps", "3", "--out", str(tmp_path / "u.png")]) == 0
    assert json.loads(Image.open(tmp_path / "u_000.png").text["rectflow"])["steps"] == 3
    # SD3.5 medium's skip layers 7, 8, 9 do not exist in a 2-3 block model: a named error, not a crash
    assert main([*common, "--preset", "sd3.5-medium", "--out", str(tmp_path / "m.png")]) == 2
    # --shift auto: the reference shift 3 at 1024 px scaled by sqrt(pixels / 1024^2)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    pipe = load_pipeline(checkpoint=str(sd3.released), text_encoder=sd3.text_encoder,
                         autoencoder=sd3.autoencoder, resolution=512)
    settings, slg = sampler_settings(parser.parse_args(["--checkpoint", "x", "--shift", "auto"]), pipe)
    assert settings["shift"] == 1.5 and settings["schedule"] == "sd3" and slg is None
    from rectflow.sampling import dynamic_shift
    settings, _ = sampler_settings(parser.parse_args(["--checkpoint", "x", "--shift", "dynamic"]), pipe)
    assert settings["schedule"] == "sd3-dynamic" and settings["shift"] == dynamic_shift((512 // 2 // 2) ** 2)


def test_no_t5_loads_no_t5_and_equals_zeros_in_its_place(sd3):
    pipe = load_pipeline(checkpoint=str(sd3.released), text_encoder=sd3.text_encoder, autoencoder=sd3.autoencoder,
                         resolution=tiny_sd3.RESOLUTION, no_t5=True)
    assert "t5" not in pipe.text_encoder.encoder_names and "t5" not in pipe.text_encoder.models
    images = generate(pipe, PROMPTS, steps=STEPS, cfg_scale=4.0, shift=3.0, schedule="sd3", seed=0)
    torch.testing.assert_close(images, ours(sd3, encoders=["clip_l", "clip_g"]), atol=1e-6, rtol=0)


def test_png_parameters_and_from_png_redraws_bit_for_bit(sd3, tmp_path):
    import numpy as np
    from PIL import Image
    from rectflow.cli import main
    common = ["--checkpoint", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
              sd3.autoencoder, "--resolution", "32", "--steps", "3", "--batch-size", "2", "--seed", "4"]
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    assert main(["sample", *common, *[x for p in prompts for x in ("--prompt", p)], "--negative-prompt", "blurry",
                 "--slg-layers", "1", "--slg-stop", "0.9", "--out", str(tmp_path / "g.png")]) == 0
    original = Image.open(tmp_path / "g_001.png")  # the second image of the first batch of two
    params = original.text["parameters"].splitlines()
    assert params[0] == "two blue squares" and params[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: Euler" in params[2] and "Seed: 5" in params[2] and "Size: 32x32" in params[2]
    assert "Model hash: " in params[2] and "Skip layers: 1 x2.8 (0.01-0.9)" in params[2]
    assert main(["sample", "--from-png", str(tmp_path / "g_001.png"), "--out", str(tmp_path / "again.png")]) == 0
    again = Image.open(tmp_path / "again.png")
    assert np.array_equal(np.asarray(again), np.asarray(original)) and again.text == original.text
    assert main(["sample", "--from-png", str(tmp_path / "g.png"), "--out", str(tmp_path / "x.png")]) == 2  # a grid


def test_image_to_image_matches_diffusers_img2img(sd3, tmp_path):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image
    from rectflow.cli import main
    from rectflow.sample import encode_images
    pipe = load_pipeline(checkpoint=str(sd3.released), text_encoder=sd3.text_encoder,
                         autoencoder=sd3.autoencoder, resolution=tiny_sd3.RESOLUTION)
    Image.new("RGB", (40, 32), (200, 40, 40)).save(tmp_path / "red.png")
    init = encode_images(pipe, [tmp_path / "red.png"])  # one image for both prompts
    ours_img = generate(pipe, PROMPTS, steps=STEPS, cfg_scale=4.0, shift=3.0, schedule="sd3", seed=0,
                        init_latents=init, strength=0.6)
    assert (ours_img - ours(sd3)).abs().max() > 1e-2
    parts = {k: getattr(tiny_sd3.diffusers_pipeline(sd3), k) for k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
        "text_encoder_3", "tokenizer_3")}
    ref_pipe = StableDiffusion3Img2ImgPipeline(**parts)
    side = tiny_sd3.RESOLUTION
    with torch.no_grad():  # the same latents (no VAE sampling) and each image's noise from its own seed
        ref = ref_pipe(PROMPTS, negative_prompt=[""] * 2, image=init.expand(2, -1, -1, -1), strength=0.6,
                       num_inference_steps=STEPS, guidance_scale=4.0, height=side, width=side,
                       max_sequence_length=77, output_type="pt",
                       generator=[torch.Generator().manual_seed(i) for i in range(2)]).images * 2 - 1
    assert (ours_img - ref).abs().max() <= 1e-4
    # through the command line, and redrawn from its PNG
    common = ["sample", "--checkpoint", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
              sd3.autoencoder, "--resolution", str(side), "--steps", "4", "--prompt", "a red circle"]
    assert main([*common, "--init-image", str(tmp_path / "red.png"), "--strength", "0.5",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert main(["sample", "--from-png", str(tmp_path / "i_000.png"), "--out", str(tmp_path / "j.png")]) == 0
    import numpy as np
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i_000.png")), np.asarray(Image.open(tmp_path / "j.png")))
    assert main([*common, "--init-image", str(tmp_path / "red.png"), "--strength", "0",
                 "--out", str(tmp_path / "k.png")]) == 2


def test_memory_options_bf16_components_tiled_decode_and_released_text_encoders(sd3, tmp_path):
    import json
    from PIL import Image
    from rectflow.cli import main
    pipe = load_pipeline(checkpoint=str(sd3.released), text_encoder=sd3.text_encoder, autoencoder=sd3.autoencoder,
                         resolution=tiny_sd3.RESOLUTION, dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.autoencoder.parameters()} == {torch.bfloat16}
    half = generate(pipe, PROMPTS, steps=STEPS, cfg_scale=4.0, shift=3.0, schedule="sd3", bf16=True,
                    release_text=True)
    assert len(pipe.text_encoder.models) == 0  # freed before the first denoising step
    assert (half - ours(sd3)).abs().mean() < 0.05  # bf16 rounding, not another image
    assert main(["sample", "--checkpoint", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
                 sd3.autoencoder, "--resolution", "32", "--steps", "2", "--dtype", "bf16", "--vae-tiling",
                 "--prompt", "a red circle", "--out", str(tmp_path / "b.png")]) == 0
    assert json.loads(Image.open(tmp_path / "b_000.png").text["rectflow"])["dtype"] == "bf16"


def test_inpainting_matches_diffusers_inpaint(sd3, tmp_path):
    from diffusers import StableDiffusion3InpaintPipeline
    from PIL import Image
    from rectflow.cli import main
    from rectflow.pipeline import encode_images, load_masks
    pipe = load_pipeline(checkpoint=str(sd3.released), text_encoder=sd3.text_encoder,
                         autoencoder=sd3.autoencoder, resolution=tiny_sd3.RESOLUTION)
    side = tiny_sd3.RESOLUTION
    Image.new("RGB", (side, side), (200, 40, 40)).save(tmp_path / "red.png")
    mask_image = Image.new("L", (side, side), 0)
    mask_image.paste(255, (0, 0, side // 2, side))  # redraw the left half
    mask_image.save(tmp_path / "mask.png")
    init, mask = encode_images(pipe, [tmp_path / "red.png"]), load_masks(pipe, [tmp_path / "mask.png"])
    assert mask.shape == (1, 1, side // 2, side // 2)
    assert mask[..., :side // 4].min() == 1 and mask[..., side // 4:].max() == 0
    kw = dict(steps=STEPS, cfg_scale=4.0, shift=3.0, schedule="sd3", seed=0, init_latents=init, strength=0.8, mask=mask)
    ours_img, ours_latents = generate(pipe, PROMPTS, **kw), generate(pipe, PROMPTS, decode=False, **kw)
    parts = {k: getattr(tiny_sd3.diffusers_pipeline(sd3), k) for k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
        "text_encoder_3", "tokenizer_3")}
    pixel_mask = torch.from_numpy(__import__("numpy").asarray(mask_image, dtype="float32") / 255)[None, None]
    # the same latents: given as the image, and (unused by 16-channel models) as the masked one; compared as latents,
    # since diffusers' SD3 inpainting pipeline decodes without the VAE's shift_factor (its other SD3 pipelines and
    # rectflow add it)
    with torch.no_grad():
        ref = StableDiffusion3InpaintPipeline(**parts)(
            PROMPTS, negative_prompt=[""] * 2, image=init.expand(2, -1, -1, -1),
            mask_image=pixel_mask.expand(2, -1, -1, -1), masked_image_latents=init.expand(2, -1, -1, -1),
            strength=0.8, num_inference_steps=STEPS, guidance_scale=4.0, height=side, width=side,
            max_sequence_length=77, output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert (ours_latents - ref).abs().max() <= 1e-4
    assert torch.equal(ours_latents[..., side // 4:], init.expand(2, -1, -1, -1)[..., side // 4:])  # kept exactly
    assert (ours_img - generate(pipe, PROMPTS, **{**kw, "mask": None})).abs().max() > 1e-2  # the mask matters
    assert main(["sample", "--checkpoint", str(sd3.released), "--text-encoder", sd3.text_encoder, "--autoencoder",
                 sd3.autoencoder, "--resolution", str(side), "--steps", "3", "--prompt", "a blue circle",
                 "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "m.png")]) == 2  # no --init-image

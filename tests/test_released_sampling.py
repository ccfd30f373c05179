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

"""CLIP score with a tiny random transformers CLIPModel saved to disk (tokenizer built locally, no hub)."""
import json

import pytest
import torch
import torch.nn.functional as F

from rectflow.evaluate.clip_score import clip_score, clip_scores
from rectflow.evaluate.features import CLIPEncoder, load_encoder

CAPTIONS = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle", "three red squares",
            "a yellow square above a blue circle", "four green triangles", "a blue triangle", "two red circles"]
SIZE = 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + word-level tokenizer + preprocessor config in a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=specials))
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<pad>", unk_token="<unk>", model_max_length=16).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=eos, bos_token_id=bos,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=4),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's: checks the folder's values are used
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": SIZE}, "image_mean": mean,
         "image_std": std, "do_resize": True, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3}))
    return folder


def images_uint8(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def direct_cosines(folder, pixels_uint8, captions):
    """The model's own forward on the reference image processor's pixel values: cos(image, caption)."""
    from transformers import AutoTokenizer, CLIPModel
    try:  # transformers 5: the PIL/numpy processor (the default one would want torchvision)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers 4: the default processor is the PIL/numpy one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
    pixel_values = processor([p.permute(1, 2, 0).numpy() for p in pixels_uint8], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=torch.as_tensor(pixel_values))
        return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_clip_score_matches_direct_computation(clip_dir):
    encoder = load_encoder(f"clip:{clip_dir}")
    assert isinstance(encoder, CLIPEncoder) and encoder.name == f"clip:{clip_dir.name}"
    captions = CAPTIONS * 2
    pixels = images_uint8(len(captions), SIZE)
    images = pixels.float() / 127.5 - 1
    ours = clip_scores(encoder, images, captions)
    cos = direct_cosines(clip_dir, pixels, captions).double()
    print("ours", ours.tolist(), "direct cos", cos.tolist())
    torch.testing.assert_close(ours, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert clip_score(encoder, images, captions) == pytest.approx(float(100 * cos.clamp(min=0).mean()), abs=1e-4)
    # a random model gives cosines of both signs: negative ones count as 0
    assert (cos > 0.01).sum() >= 3 and (cos < -0.01).sum() >= 3
    assert (ours[cos < 0] == 0).all()


def test_clip_score_resizes_larger_images(clip_dir):
    encoder = load_encoder(f"clip:{clip_dir}")
    coarse = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # smooth images: downsampling the large one gives nearly the small one
    small = F.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)
    large = F.interpolate(coarse, size=2 * SIZE, mode="bilinear", align_corners=False)
    torch.testing.assert_close(encoder.preprocess(large), encoder.preprocess(small), atol=0.1, rtol=0)
    assert F.cosine_similarity(encoder.image_features(large), encoder.image_features(small)).min() > 0.99
    # non-square: the shorter side is resized, then the centre cropped
    pad = torch.full((8, 3, 2 * SIZE, SIZE), -1.0)
    wide = torch.cat([pad, large, pad], dim=-1)
    # (away from the crop's left and right edges, where the resize kernel reaches into the padding)
    torch.testing.assert_close(encoder.preprocess(wide)[..., 2:-2], encoder.preprocess(large)[..., 2:-2])


def test_clip_features_shapes_and_batching(clip_dir):
    encoder = load_encoder(f"clip:{clip_dir}")
    encoder.batch_size = 3  # uneven batches give the same features as one batch
    images = images_uint8(7, SIZE).float() / 127.5 - 1
    feats = encoder.image_features(images)
    encoder.batch_size = 64
    torch.testing.assert_close(feats, encoder.image_features(images))
    assert feats.shape == (7, 24)
    assert encoder.text_features(CAPTIONS[:4]).shape == (4, 24)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_scores(encoder, images, CAPTIONS)


def test_bad_encoder_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder spec"):
        load_encoder("inception")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(f"clip:{tmp_path}")

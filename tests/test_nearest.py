"""Nearest-glyph top-1 (rectflow.evaluate.nearest) and its place in `rectflow eval` on emoji."""
import json

import pytest
import torch

from rectflow.cli import main
from rectflow.config import TrainConfig
from rectflow.data import get_dataset
from rectflow.evaluate.nearest import glyph_indices, nearest_top1, reference_features
from rectflow.train import build_model, save_checkpoint


class PixelEncoder:
    """Flattened pixels as image features: a glyph is its own nearest neighbour."""

    def image_features(self, images):
        return images.flatten(1).float()


def test_top1_by_hand():
    reference = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    captions = ["a", "b", "c"]
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.9, 0.0, 0.1], [0.0, 3.0, 0.0]])
    # nearest: a, c, a, b -> right for prompts a, c, (c: wrong), b
    out = nearest_top1(images, ["a", "c", "c", "b"], reference, captions)
    assert out == {"top1": 0.75, "n": 4, "chance": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="one prompt per image: 2 prompts, 4 images"):
        nearest_top1(images, ["a", "b"], reference, captions)


def test_training_glyphs_are_their_own_nearest_and_noise_is_not():
    train = get_dataset("emoji", 32, split="train", seed=0)
    indices = glyph_indices(train, 50, seed=3)
    prompts = [train.captions[i] for i in indices]
    assert len(set(prompts)) == 50 and indices == glyph_indices(train, 50, seed=3) != glyph_indices(train, 50, seed=4)
    feats = reference_features(PixelEncoder(), train)
    real = torch.stack([train[i]["image"] for i in indices])
    assert nearest_top1(PixelEncoder().image_features(real), prompts, feats, train.captions)["top1"] == 1.0
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    assert nearest_top1(PixelEncoder().image_features(noise), prompts, feats, train.captions)["top1"] < 0.1


@pytest.mark.slow
def test_eval_reports_glyph_top1_on_emoji(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data="emoji", depth=1, hidden=48, heads=2, patch_size=4, resolution=32, sample_every=0).validate()
    cfg.save(run / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3, latent_size=32, context_dim=384, pooled_dim=384)
    save_checkpoint(run, 1, model, model, {"step": 1}, cfg)
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--out", str(out), "--samples", "6", "--settings", "2x1.0",
                 "--weights", "ema", "--val-samples", "4", "--ref-samples", "20", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert list(report["glyph_top1"]) == ["ema/euler-2/cfg-1"]
    assert report["results"][0]["glyph_top1"]["n"] == 6 and 0 <= report["glyph_top1"]["ema/euler-2/cfg-1"] <= 1
    truth = report["ground_truth"]["glyph_top1"]
    assert truth["n"] == 6 and truth["top1"] >= 5 / 6  # the real glyphs (near-duplicates may trade places)
    assert "glyph top-1" in out.with_suffix(".md").read_text()

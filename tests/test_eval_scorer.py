"""The small offline CLIP-style scorer: the shipped file, its recorded accuracy, its loss and its file format."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rectflow.evaluate.scorer import (ASSET, Scorer, canonical_caption, contrastive_loss, retrieval_accuracy,
                                      scorer_data)


@pytest.fixture(scope="module")
def shipped():
    return Scorer.load()


def test_shipped_scorer_file_and_report(shipped):
    assert ASSET.stat().st_size < 5 * 2**20
    report = json.loads(ASSET.with_suffix(".json").read_text())
    assert report["command"].startswith("rectflow train-scorer ")
    for source in ("shapes", "emoji", "shapes_up_to_order"):
        assert set(report["retrieval_image_to_text"][source]) == {"top1", "top5", "n_images", "n_captions"}
    assert shipped.name.startswith(report["name"] + "@") and len(shipped.name) == len(report["name"]) + 9


def test_shipped_scorer_reproduces_its_recorded_emoji_accuracy(shipped):
    recorded = json.loads(ASSET.with_suffix(".json").read_text())["retrieval_image_to_text"]["emoji"]
    images, captions, sources = scorer_data("val", 0, seed=0)
    assert set(sources) == {"emoji"} and len(captions) == recorded["n_images"]
    again = retrieval_accuracy(shipped, images, captions)
    assert again["top1"] == pytest.approx(recorded["top1"], abs=1e-6)
    assert again["top5"] == pytest.approx(recorded["top5"], abs=1e-6)
    assert again["top1"] > 20 / recorded["n_captions"]  # far above chance


def test_shipped_scorer_prefers_the_right_caption_on_held_out_shapes(shipped):
    from rectflow.data import ShapesDataset
    val = ShapesDataset(32, split="val")
    items = [val[i] for i in range(64)]
    images = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    image_feats = F.normalize(shipped.image_features(images), dim=-1)
    right = (image_feats * F.normalize(shipped.text_features(captions), dim=-1)).sum(-1)
    wrong = (image_feats * F.normalize(shipped.text_features(captions[1:] + captions[:1]), dim=-1)).sum(-1)
    assert (right > wrong).float().mean() > 0.9
    # 64 px images are resized to the scorer's 32 px and score like the 32 px renders
    big = torch.stack([ShapesDataset(64, split="val")[i]["image"] for i in range(16)])
    assert F.cosine_similarity(shipped.image_features(big), shipped.image_features(images[:16])).min() > 0.8


def test_contrastive_loss_counts_repeated_captions_as_positives():
    emb = torch.eye(3)
    ids = torch.tensor([0, 0, 1])
    scale = torch.tensor(math.log(10.0))
    loss = contrastive_loss(emb, emb, ids, scale)
    logits = 10 * emb @ emb.T
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = -(targets * logits.log_softmax(1)).sum(1).mean()  # symmetric: logits.T == logits here
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # the temperature is clamped at CLIP's maximum logit scale of 100
    assert float(contrastive_loss(emb, emb, ids, torch.tensor(10.0))) == pytest.approx(
        float(contrastive_loss(emb, emb, ids, torch.tensor(math.log(100.0)))), rel=1e-6)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    scorer = Scorer({"widths": [8, 8, 8, 8], "embed_dim": 16, "hidden": 32})
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    text = torch.randn(4, 384)
    ids = torch.arange(16) % 4
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = contrastive_loss(scorer.image_tower(images), scorer.text_tower(text[ids]), ids, scorer.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip_and_bad_files(tmp_path):
    torch.manual_seed(0)
    scorer = Scorer({"widths": [8, 8, 8, 8], "embed_dim": 16, "hidden": 32}, name="mine")
    path = tmp_path / "mine.safetensors"
    scorer.save(path)
    loaded = Scorer.load(path)
    assert loaded.config == scorer.config and loaded.name.startswith("mine@")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.image_features(x), scorer.eval().image_features(x))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a rectflow scorer file"):
        Scorer.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="train-scorer"):
        Scorer.load(tmp_path / "missing.safetensors")


def test_canonical_captions():
    assert canonical_caption("a red circle and a blue square") == canonical_caption("a blue square and a red circle")
    assert canonical_caption("a red circle to the right of an purple square") == \
        "an purple square to the left of a red circle"
    assert canonical_caption("a red circle below a blue square") == "a blue square above a red circle"
    assert canonical_caption("a red circle to the left of a blue square") != \
        canonical_caption("a blue square to the left of a red circle")
    assert canonical_caption("three red squares") == "three red squares"

"""The shapes detector on ground-truth renders, and GenEval-style scoring of right and wrong images."""
import copy

import numpy as np
import pytest
import torch

from rectflow.data.shapes import CATEGORIES, PALETTE, SHAPES, ShapesDataset, eval_prompts, render_scene, to_tensor
from rectflow.evaluate.geneval import ShapesDetector, classify_shape, exact_match, geneval_scores, is_correct

RESOLUTION = 32


@pytest.fixture(scope="module")
def metas():
    """1,100 validation scenes: the fixed GenEval prompt set (100 per category) and 500 of the val split."""
    val = ShapesDataset(RESOLUTION, split="val")
    return eval_prompts(100, seed=0) + [val.meta(i) for i in range(500)]


def test_detector_exact_match_on_1000_ground_truth_renders(metas):
    detector = ShapesDetector()
    hits = [exact_match(m, detector(render_scene(m, RESOLUTION))) for m in metas]
    accuracy = float(np.mean(hits))
    print(f"detector exact-match accuracy {accuracy:.4f} on {len(metas)} renders at {RESOLUTION}px")
    assert len(metas) >= 1000
    assert accuracy >= 0.99


def test_detector_reads_positions_and_accepts_tensors(metas):
    detector = ShapesDetector()
    meta = next(m for m in metas if m["category"] == "counting" and len(m["objects"]) == 4)
    image = render_scene(meta, RESOLUTION)
    found = detector(to_tensor(image))
    assert [(d.shape, d.color) for d in found] == [(d.shape, d.color) for d in detector(image)]
    truth = sorted(tuple(o["center"]) for o in meta["objects"])
    got = sorted(d.center for d in found)
    assert np.allclose(got, truth, atol=1.5 / RESOLUTION)  # centroids within rounding of the drawn boxes
    assert detector(torch.ones(3, RESOLUTION, RESOLUTION)) == []  # blank white: nothing
    assert classify_shape(np.pi / 4, 0.5) == "circle" and classify_shape(0.98, 0.5) == "square"
    assert classify_shape(0.55, 0.3) == "triangle"


def test_geneval_of_ground_truth_renders_is_one_per_category(metas):
    prompts = metas[:600]
    images = [to_tensor(render_scene(m, RESOLUTION)) for m in prompts]
    scores = geneval_scores(prompts, images)
    assert scores["counts"] == {c: 100 for c in CATEGORIES}
    assert all(scores[c] == 1.0 for c in CATEGORIES) and scores["overall"] == 1.0


def _recolor(meta):
    """The same scene with every object in the next palette colour."""
    names = list(PALETTE)
    out = copy.deepcopy(meta)
    for o in out["objects"]:
        o["color"] = names[(names.index(o["color"]) + 1) % len(names)]
    return out


def _reshape(meta):
    """The same scene with every object turned into the next shape."""
    out = copy.deepcopy(meta)
    for o in out["objects"]:
        o["shape"] = SHAPES[(SHAPES.index(o["shape"]) + 1) % len(SHAPES)]
    return out


def _score_renders(prompts, scenes):
    return geneval_scores(prompts, [render_scene(s, RESOLUTION) for s in scenes])


def test_geneval_of_wrong_images_is_lower(metas):
    prompts = metas[:600]
    # wrong colours: the colour-checking categories fail, the colour-blind ones (as in GenEval) still pass
    scores = _score_renders(prompts, [_recolor(m) for m in prompts])
    assert scores["colors"] == scores["color_attr"] == scores["position"] == 0.0
    assert scores["single_object"] == scores["two_object"] == scores["counting"] == 1.0
    assert scores["overall"] == 0.5
    # wrong shapes (a cyclic shift of the three shapes never maps a pair onto itself): every category fails
    scores = _score_renders(prompts, [_reshape(m) for m in prompts])
    assert all(scores[c] == 0.0 for c in CATEGORIES) and scores["overall"] == 0.0
    # one object missing: counting, two-object and the binding categories fail
    dropped = [{**m, "objects": m["objects"][1:]} for m in prompts]
    scores = _score_renders(prompts, dropped)
    assert scores["counting"] == scores["two_object"] == scores["color_attr"] == scores["position"] == 0.0
    # the relation reversed in the prompt: position fails on the true render
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    detector = ShapesDetector()
    for m in (m for m in prompts if m["category"] == "position"):
        found = detector(render_scene(m, RESOLUTION))
        assert is_correct(m, found) and not is_correct({**m, "relation": opposite[m["relation"]]}, found)


def test_geneval_tolerates_colour_noise(metas):
    prompts = metas[:120]
    g = torch.Generator().manual_seed(0)
    noisy = [(to_tensor(render_scene(m, RESOLUTION)) + 0.15 * torch.randn(3, RESOLUTION, RESOLUTION, generator=g))
             .clamp(-1, 1) for m in prompts]
    scores = geneval_scores(prompts, noisy)
    assert scores["overall"] == 1.0, scores
    with pytest.raises(ValueError, match="one meta per image"):
        geneval_scores(prompts, noisy[:3])

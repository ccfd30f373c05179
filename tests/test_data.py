"""Built-in data: shapes scenes and captions, emoji glyphs, image folders with broken files."""
import collections
import dataclasses
import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from rectflow.config import TrainConfig
from rectflow.data import collate, get_dataset
from rectflow.data import shapes as S
from rectflow.data.emoji import EmojiDataset
from rectflow.data.folder import ImageFolderDataset, mirror_caption
from rectflow.training.data import data_options


def _metas(category, n=150, seed=0):
    """n scenes of a category from seeded streams."""
    return [S.sample_meta(random.Random(f"t/{seed}/{category}/{i}"), category) for i in range(n)]


# ---------------------------------------------------------------- shapes: captions

def test_caption_templates():
    tri = {"shape": "triangle", "color": "green", "center": [0.3, 0.5], "size": 0.3}
    circ = {"shape": "circle", "color": "yellow", "center": [0.7, 0.5], "size": 0.3}
    assert S.caption_for({"category": "single_object", "objects": [tri]}) == "a green triangle"
    assert S.caption_for({"category": "colors", "objects": [circ]}) == "a yellow circle"
    assert S.caption_for({"category": "two_object", "objects": [tri, circ]}) == "a green triangle and a yellow circle"
    assert S.caption_for({"category": "counting", "objects": [tri] * 3}) == "three green triangles"
    pos = {"category": "position", "objects": [tri, circ], "relation": "left"}
    assert S.caption_for(pos) == "a green triangle to the left of a yellow circle"
    assert S.caption_for({**pos, "relation": "below"}) == "a green triangle below a yellow circle"


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_scenes_obey_their_category_and_caption(category):
    for meta in _metas(category):
        objs = meta["objects"]
        assert meta["category"] == category
        caption = S.caption_for(meta)
        for o in objs:
            assert o["shape"] in S.SHAPES and o["color"] in S.PALETTE
            assert f"{o['color']} {o['shape']}" in caption
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert x1 - x0 == pytest.approx(o["size"], abs=2e-4)
        n = len(objs)
        if category in ("single_object", "colors"):
            assert n == 1
        elif category == "two_object":
            assert n == 2 and objs[0]["shape"] != objs[1]["shape"]
        elif category == "color_attr":
            assert n == 2 and objs[0]["shape"] != objs[1]["shape"] and objs[0]["color"] != objs[1]["color"]
        elif category == "counting":
            assert 2 <= n <= 4 and len({(o["shape"], o["color"]) for o in objs}) == 1
            assert caption.startswith(S.NUMBERS[n] + " ") and caption.endswith("s")
        else:
            assert n == 2 and (objs[0]["shape"], objs[0]["color"]) != (objs[1]["shape"], objs[1]["color"])
            assert S.relation_of(objs[0]["center"], objs[1]["center"]) == meta["relation"]
            assert S.RELATIONS[meta["relation"]] in caption
        json.dumps(meta)  # serialisable


def test_all_categories_counts_and_relations_occur():
    ds = S.ShapesDataset(32)
    metas = [ds.meta(i) for i in range(600)]
    assert {m["category"] for m in metas} == set(S.CATEGORIES)
    assert {len(m["objects"]) for m in metas} == {1, 2, 3, 4}
    assert {m["relation"] for m in metas if "relation" in m} == set(S.RELATIONS)
    assert {o["color"] for m in metas for o in m["objects"]} == set(S.PALETTE)


# ---------------------------------------------------------------- shapes: rendering readable by a detector

def _read(image):
    """A minimal detector: per palette colour, connected components -> (shape by fill ratio, colour, box)."""
    arr = np.asarray(image).astype(int)
    found = []
    known = np.zeros(arr.shape[:2], bool)
    for name, rgb in S.PALETTE.items():
        mask = (arr == rgb).all(-1)
        known |= mask
        labels, n = ndimage.label(mask)
        for sl in ndimage.find_objects(labels):
            area = (labels[sl] > 0).sum()
            fill = area / ((sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start))
            shape = min(S.FILL_RATIO, key=lambda s: abs(S.FILL_RATIO[s] - fill))
            found.append((shape, name, (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)))
    background = (arr == S.BACKGROUND).all(-1)
    assert (known | background).all(), "render has colours outside the palette (anti-aliasing?)"
    return sorted(found)


def test_renders_are_exact_and_readable_at_32():
    metas = [m for c in S.CATEGORIES for m in _metas(c, 40, seed=1)]
    for meta in metas:
        got = _read(S.render_scene(meta, 32))
        want = sorted((o["shape"], o["color"], S.pixel_box(o, 32)) for o in meta["objects"])
        assert got == want, (S.caption_for(meta), got, want)


def test_render_is_deterministic():
    metas = _metas("counting", 200)
    images = [S.render_scene(m, 32) for m in metas]
    assert all(a.tobytes() == S.render_scene(m, 32).tobytes() for a, m in zip(images[:20], metas))
    assert S.render_scene(metas[0], 64).size == (64, 64)


# ---------------------------------------------------------------- shapes: data set and splits

def test_shapes_items_deterministic_per_index():
    a, b = get_dataset("shapes", 32, seed=3), get_dataset("shapes", 32, seed=3)
    for i in (0, 7, 123456789):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["meta"] == y["meta"]
        assert x["image"].shape == (3, 32, 32) and x["image"].dtype == torch.float32
        assert x["image"].min() >= -1 and x["image"].max() <= 1
        assert x["caption"] == S.caption_for(x["meta"])
    other = get_dataset("shapes", 32, seed=4)
    assert [other.meta(i) for i in range(20)] != [a.meta(i) for i in range(20)]
    assert len(a) == S.ShapesDataset.TRAIN_SIZE


def test_shapes_val_fixed_and_disjoint():
    val0 = get_dataset("shapes", 32, split="val", seed=0)
    val5 = get_dataset("shapes", 32, split="val", seed=5, val_size=50)
    assert len(val0) == 1000 and len(val5) == 50
    assert [val0.meta(i) for i in range(50)] == [val5.meta(i) for i in range(50)]  # same for every run seed
    train = {json.dumps(get_dataset("shapes", 32, seed=s).meta(i)) for s in (0, 5) for i in range(2000)}
    assert not train & {json.dumps(val0.meta(i)) for i in range(1000)}
    with pytest.raises(IndexError):
        val5[50]


def test_shapes_category_subset_and_errors():
    ds = get_dataset("shapes", 16, categories=["position"])
    assert {ds.meta(i)["category"] for i in range(30)} == {"position"}
    with pytest.raises(ValueError, match="unknown shapes categories"):
        get_dataset("shapes", 16, categories=["texture"])
    with pytest.raises(ValueError, match="split"):
        get_dataset("shapes", 16, split="test")


def test_shapes_category_weights_skew_the_training_stream_only():
    """Weights 3 / 2 / 1 give the categories shares 3/9, 2/9, 1/9 of the training stream, a weight 0 none; the
    validation split (validation loss, FID reference) and the unweighted stream are as without weights."""
    weights = {"position": 3, "counting": 2, "colors": 0}
    train = get_dataset("shapes", 16, seed=3, category_weights=weights)
    counts = collections.Counter(train.meta(i)["category"] for i in range(9000))
    assert "colors" not in counts
    want = {"position": 3 / 8, "counting": 2 / 8, "single_object": 1 / 8, "two_object": 1 / 8, "color_attr": 1 / 8}
    for c, share in want.items():
        assert abs(counts[c] / 9000 - share) < 0.015, (c, counts[c])
    val = get_dataset("shapes", 16, split="val", category_weights=weights)
    assert [val.meta(i) for i in range(40)] == [get_dataset("shapes", 16, split="val").meta(i) for i in range(40)]
    assert train.meta(7) == get_dataset("shapes", 16, seed=3, category_weights=weights).meta(7)  # deterministic
    with pytest.raises(ValueError, match="category_weights': unknown or unused categories \\['colors'\\]"):
        get_dataset("shapes", 16, categories=["position"], category_weights={"colors": 2})
    with pytest.raises(ValueError, match="expected weights >= 0"):
        get_dataset("shapes", 16, category_weights={"position": -1})


def test_shapes_curriculum_changes_the_mix_along_the_training_stream():
    """Stage k covers the next `scenes` scenes of the (in-order) training stream with its categories and weights; the
    last stage runs on; the validation split is untouched; rectflow train turns steps / fractions into scenes."""
    curriculum = [{"scenes": 50, "categories": ["position"]}, {"scenes": 40, "categories": ["colors", "counting"],
                  "category_weights": {"counting": 3}}, {}]
    train = get_dataset("shapes", 16, seed=1, curriculum=curriculum)
    assert {train.meta(i)["category"] for i in range(50)} == {"position"}
    middle = collections.Counter(train.meta(i)["category"] for i in range(50, 90))
    assert set(middle) == {"colors", "counting"} and middle["counting"] > middle["colors"]
    assert set(collections.Counter(train.meta(i)["category"] for i in range(90, 400))) == set(S.CATEGORIES)
    assert train.meta(200) == get_dataset("shapes", 16, seed=1).meta(200)  # the even last stage: the plain stream
    val = get_dataset("shapes", 16, split="val", curriculum=curriculum)
    assert [val.meta(i) for i in range(20)] == [get_dataset("shapes", 16, split="val").meta(i) for i in range(20)]
    for bad, match in [([{"categories": ["position"]}, {}], "stage 0: expected 'scenes' a positive integer"),
                       ([{"scenes": 5, "categories": ["texture"]}, {}], "stage 0: unknown or unused categories"),
                       ([{"scenes": 5, "steps": 2}, {}], "'steps' is converted to scenes by rectflow train"),
                       ([{"scenes": 5}, {"category_weights": {"position": -1}}], "stage 1 'category_weights': "
                                                                                   "expected weights >= 0"),
                       ({"scenes": 5}, "expected a list of stages")]:
        with pytest.raises(ValueError, match=match):
            get_dataset("shapes", 16, curriculum=bad)
    with pytest.raises(ValueError, match="exclude each other"):
        get_dataset("shapes", 16, category_weights={"position": 2}, curriculum=[{}])

    cfg = TrainConfig(batch_size=8, max_steps=100, data_options={"curriculum": [
        {"steps": 10, "categories": ["position"]}, {"fraction": 0.25}, {"scenes": 3}, {}]})
    assert data_options(cfg)["curriculum"] == [{"scenes": 80, "categories": ["position"]}, {"scenes": 200},
                                                {"scenes": 3}, {}]
    for stage, match in [({"steps": 2, "fraction": 0.5}, "expected one of them"),
                         ({"fraction": 1.5}, "fraction must be in \\(0, 1\\)"), ({"steps": 0}, "positive integer")]:
        with pytest.raises(ValueError, match=match):
            data_options(dataclasses.replace(cfg, data_options={"curriculum": [stage, {}]}))


def test_eval_prompts():
    metas = S.eval_prompts(10, seed=0)
    assert len(metas) == 60 and metas == S.eval_prompts(10, seed=0) and metas != S.eval_prompts(10, seed=1)
    assert [m["category"] for m in metas] == [c for c in S.CATEGORIES for _ in range(10)]
    for c in S.CATEGORIES:
        assert len({S.caption_for(m) for m in metas if m["category"] == c}) == 10  # distinct while possible
    assert len(S.eval_prompts(30, categories=["single_object"])) == 30  # only 18 captions: repeats allowed


# ---------------------------------------------------------------- emoji

def test_emoji_counts_split_and_known_glyph():
    train, val = EmojiDataset(32, "train"), EmojiDataset(32, "val")
    total = len(train) + len(val)
    assert total > 3500 and len(val) == (total + 19) // 20
    assert set(train.indices).isdisjoint(val.indices) and all(i % 20 == 0 for i in val.indices)
    caps = train.captions + val.captions
    seqs = train.sequences + val.sequences
    k = caps.index("grinning face")
    assert seqs[k] == "1F600"
    assert "flag: France" in caps and "thumbs up medium skin tone" in caps
    single = EmojiDataset(32, "train", subset="single")
    assert 1300 < len(single) + len(EmojiDataset(32, "val", subset="single")) < 1500
    assert set(single.kinds) == {"single"} and set(single.indices) <= set(train.indices)
    item = (train + val)[k]
    img = item["image"]
    assert img.shape == (3, 32, 32) and (img[:, 0, 0] > 0.95).all()  # white corner
    assert img[0].mean() > img[2].mean() + 0.3  # a yellow face: far more red than blue


def test_emoji_resize_and_errors():
    ds = get_dataset("emoji", 16, split="val")
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["meta"]["index"] == 0
    assert ds[0]["caption"] == EmojiDataset(32, "val").captions[0]
    with pytest.raises(ValueError, match="subset"):
        EmojiDataset(16, subset="animals")
    with pytest.raises(FileNotFoundError, match="build_emoji"):
        EmojiDataset(16, path="/nonexistent/emoji.npz")


def _builder():
    """scripts/build_emoji.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_emoji.py"
    spec = importlib.util.spec_from_file_location("build_emoji", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emoji_builder_names_and_shipped_render():
    b = _builder()
    assert b.kind_of("\U0001F600") == "single" and b.kind_of("\u263A\ufe0f") == "single"
    assert b.kind_of("\U0001F44D\U0001F3FD") == "skin_tone" and b.kind_of("#\ufe0f\u20e3") == "keycap"
    assert b.kind_of("\U0001F1FA\U0001F1F8") == "flag" and b.kind_of("\U0001F3F3\ufe0f\u200d\U0001F308") == "zwj"
    assert b.caption_of("x", ":United_States:", "flag") == "flag: United States"
    assert b.caption_of("x", ":thumbs_up_medium_skin_tone:", "skin_tone") == "thumbs up medium skin tone"
    from pathlib import Path

    if not Path(b.FONT).is_file():
        pytest.skip("Noto Color Emoji not installed (apt-get install fonts-noto-color-emoji)")
    from PIL import ImageFont

    font = ImageFont.truetype(b.FONT, b.BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
    shipped = EmojiDataset(32, "val")  # glyph 0 of the file is in val
    first = "".join(chr(int(cp, 16)) for cp in shipped.sequences[0].split())
    again = np.asarray(b.render(font, first).resize((32, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(again, shipped.images[0].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------- image folders

def _png(path, mode="RGB", size=(20, 12), color=(10, 200, 30)):
    """A plain PNG, whatever the file's extension."""
    Image.new(mode, size, color).save(path, format="PNG")


@pytest.fixture
def messy_folder(tmp_path):
    """Good, unusual and broken image files with captions in sidecars and a metadata.jsonl."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _png(d / "good.png")
    (d / "good.txt").write_text("a green bar on the left\n")
    Image.new("RGB", (30, 30), (200, 0, 0)).save(d / "photo.jpg", quality=90)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg")                       # -> red
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(d / "deep.png")                  # 16-bit -> white
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(d / "sub" / "clear.png")                  # transparent -> white
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(d / "pal.png")                                                                    # palette -> blue
    _png(d / "disguised.jpg")                                                                  # PNG bytes, .jpg name
    (d / "zero.png").write_bytes(b"")
    raw = (d / "photo.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    _png(d / "full.png", size=(64, 64))
    (d / "cut.png").write_bytes((d / "full.png").read_bytes()[:60])
    (d / "full.png").unlink()
    (d / "notes.png").write_text("not an image at all")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "photo.jpg", "text": "a red square photo"}) + "\n"
                                      + json.dumps({"file_name": "sub/clear.png", "caption": "nothing"}) + "\n"
                                      + "{broken json\n")
    return d


def test_folder_converts_or_skips_every_broken_file(messy_folder, caplog):
    with caplog.at_level(logging.INFO, logger="rectflow.data.folder"):
        ds = ImageFolderDataset(messy_folder, 16, val_every=10**6)
    names = sorted(p.name for p in ds.paths)
    assert names == ["clear.png", "cmyk.jpg", "deep.png", "disguised.jpg", "good.png", "pal.png", "photo.jpg"]
    assert sorted((p.split("/")[-1], r) for p, r in ds.skipped) == [
        ("cut.jpg", "truncated or corrupt"), ("cut.png", "truncated or corrupt"),
        ("notes.png", "not an image"), ("zero.png", "empty file")]
    assert ds.counts["converted: cmyk"] == 1 and ds.counts["converted: 16-bit"] == 1
    assert ds.counts["converted: alpha"] == 1 and ds.counts["converted: palette"] == 1
    assert ds.counts["converted: wrong extension"] == 1 and ds.counts["bad metadata lines"] == 1
    assert ds.counts["no caption"] == 4  # cmyk, deep, pal, disguised
    assert "7 usable images of 11 files" in caplog.text and "1 skipped: empty file" in caplog.text
    items = {ds.paths[i].name: ds[i] for i in range(len(ds))}
    assert items["good.png"]["caption"] == "a green bar on the left"
    assert items["photo.jpg"]["caption"] == "a red square photo"
    assert items["clear.png"]["caption"] == "nothing" and items["deep.png"]["caption"] == ""
    px = {k: v["image"][:, 8, 8] for k, v in items.items()}
    assert torch.allclose(px["deep.png"], torch.ones(3)) and torch.allclose(px["clear.png"], torch.ones(3))
    assert px["pal.png"].tolist() == [-1.0, -1.0, 1.0]
    assert px["cmyk.jpg"][0] > 0.9 and px["cmyk.jpg"][1:].max() < -0.9
    assert all(v["image"].shape == (3, 16, 16) for v in items.values())


def test_folder_crop_modes_hflip_and_splits(tmp_path):
    d = tmp_path / "wide"
    d.mkdir()
    arr = np.zeros((10, 40, 3), np.uint8)
    arr[:, :10] = 255  # left quarter white, the rest black
    for i in range(5):
        Image.fromarray(arr).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"white on the left {i}")
    center = ImageFolderDataset(d, 8, crop="center", val_every=5)[0]["image"]
    pad = ImageFolderDataset(d, 8, crop="pad", val_every=5)[0]["image"]
    squash = ImageFolderDataset(d, 8, crop="resize", val_every=5)
    assert center.max() < -0.9  # the middle of the wide image: black only
    assert (pad[:, 0] > 0.9).all() and (pad[:, 4, 0] > 0.9).all() and (pad[:, 4, -1] < -0.9).all()  # letterbox
    assert (squash[0]["image"][:, :, 0] > 0.9).all() and (squash[0]["image"][:, :, -1] < -0.9).all()
    assert len(squash) == 4 and [p.name for p in ImageFolderDataset(d, 8, "val", val_every=5).paths] == ["4.png"]
    flip = ImageFolderDataset(d, 8, crop="resize", hflip=True, val_every=5)
    assert len(flip) == 8
    assert torch.equal(flip[5]["image"], squash[1]["image"].flip(-1))
    assert torch.equal(flip[1]["image"], squash[1]["image"])
    assert flip[5]["caption"] == "white on the right 1" and flip[5]["meta"]["flipped"]
    assert flip[1]["caption"] == "white on the left 1" and not flip[1]["meta"]["flipped"]
    assert mirror_caption("Left of the right-hand bird, leftover") == "Right of the left-hand bird, leftover"
    with pytest.raises(ValueError, match="no validation images"):
        ImageFolderDataset(d, 8, "val")  # 5 images, val_every=20


def test_folder_dedicated_split_folders_and_errors(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        _png(tmp_path / split / f"{split}.png")
    assert [p.name for p in get_dataset(str(tmp_path), 8, "val").paths] == ["validation.png"]
    assert [p.name for p in get_dataset(f"folder:{tmp_path}", 8).paths] == ["train.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        get_dataset(str(empty), 8)
    (empty / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="all 1 image files were skipped"):
        get_dataset(str(empty), 8, val_every=2)
    with pytest.raises(ValueError, match="unknown data set"):
        get_dataset("imagenet", 8)


def test_collate_mixed_metas():
    ds = get_dataset("shapes", 8)
    batch = collate([ds[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 8, 8) and len(batch["caption"]) == 6 and len(batch["meta"]) == 6
    loader = torch.utils.data.DataLoader(get_dataset("emoji", 8, split="val"), batch_size=4, collate_fn=collate)
    assert next(iter(loader))["image"].shape == (4, 3, 8, 8)

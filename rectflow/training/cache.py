"""The latent cache: a finite data set's latents, encoded once before training into sharded safetensors.

Item i (the data-set index, never a loader position, so shuffling cannot pair a latent with another caption) lives
in shard i // shard_size under the key str(i); items of different buckets have different shapes. The cache folder
is named by a hash of everything the latents depend on (the data set and its options, resolution and buckets, the
autoencoder's identity, the dtype, the item count): a change of any of them is a new folder, so stale latents are
never read. A shard that is missing or damaged (a kill mid-write, a truncated copy) is recomputed; shards are written
atomically.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rectflow.files import DamagedFile, atomic_path, check_safetensors, write_json

SHARD_SIZE = 256
IDENTITY = "identity.json"


def autoencoder_identity(autoencoder) -> dict:
    """The autoencoder's spec and the size and modification time of the files it names (new weights at the same
    path are a new identity)."""
    spec = getattr(autoencoder, "spec", type(autoencoder).__name__)
    _, _, path = spec.partition(":")
    files = {}
    root = Path(path) if path else None
    if root is not None and root.exists():
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
                st = f.stat()
                files[str(f.relative_to(root) if root.is_dir() else f.name)] = [st.st_size, st.st_mtime_ns]
    return {"spec": spec, "files": files}


class LatentCache:
    """Sharded latents of items 0..n-1 under root/latents-<hash of identity>/."""

    def __init__(self, root: Path, identity: dict, n: int, shard_size: int = SHARD_SIZE, keep_shards: int = 8):
        self.identity = {**identity, "n": n, "shard_size": shard_size}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"latents-{digest}"
        self.n, self.shard_size = n, shard_size
        self.shards = (n + shard_size - 1) // shard_size
        self._loaded: OrderedDict[int, dict] = OrderedDict()
        self.keep_shards = keep_shards

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard_{k:05d}.safetensors"

    def shard_items(self, k: int) -> range:
        return range(k * self.shard_size, min(self.n, (k + 1) * self.shard_size))

    def shard_ok(self, k: int) -> bool:
        """Shard k exists, its header parses, its data is all there and it holds exactly its items."""
        path = self.shard_path(k)
        if not path.is_file():
            return False
        try:
            header = check_safetensors(path)
        except DamagedFile:
            return False
        return set(header) - {"__metadata__"} == {str(i) for i in self.shard_items(k)}

    def missing(self) -> list[int]:
        """Shards to (re)compute."""
        return [k for k in range(self.shards) if not self.shard_ok(k)]

    def build(self, encode: Callable[[list[int]], list[torch.Tensor]], batch: int = 16, progress: bool = True) -> int:
        """Encode the items of every missing or damaged shard (encode: indices -> their latents); returns the number
        of shards written."""
        todo = self.missing()
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / IDENTITY, self.identity)
        items = sum(len(self.shard_items(k)) for k in todo)
        bar = tqdm(total=items, unit="img", desc="caching latents", disable=not progress, dynamic_ncols=True)
        for k in todo:
            tensors = {}
            indices = list(self.shard_items(k))
            for lo in range(0, len(indices), batch):
                part = indices[lo:lo + batch]
                for i, latent in zip(part, encode(part)):
                    tensors[str(i)] = latent.detach().cpu().contiguous()
                bar.update(len(part))
            with atomic_path(self.shard_path(k)) as tmp:
                save_file(tensors, str(tmp))
        bar.close()
        return len(todo)

    def _shard(self, k: int) -> dict:
        if k not in self._loaded:
            self._loaded[k] = load_file(str(self.shard_path(k)))
            while len(self._loaded) > self.keep_shards:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(k)
        return self._loaded[k]

    def get(self, indices: list[int]) -> torch.Tensor:
        """The latents of the items, stacked (they must share a shape: one bucket)."""
        return torch.stack([self._shard(i // self.shard_size)[str(i)] for i in indices])

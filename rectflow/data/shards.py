"""WebDataset-style tar shards: the layout public image-text sets ship in, written by `rectflow shards` and streamed
by training (docs/data.md "Shards").

A shard is a tar whose members are grouped into samples by key (the member name up to the first dot of its base
name): `00000042.jpg` (or .png / .webp) with `00000042.txt` (the caption) and `00000042.json` ({"caption", "width",
"height", ...}). A shard set is a folder with a manifest.json (sample counts, sizes and sha256 per shard), a folder
of .tar files, a brace pattern (`data-{000000..000099}.tar`) or one tar; any of them may be an fsspec URL.

Streaming (ShardStream): S streams (one per rank x DataLoader worker) each read their own shards, 1/S of a seeded
per-epoch shard order, through a seeded shuffle buffer drained at the end of each epoch. A stream's position is
(epoch, records drawn in it): a resumed stream re-reads that many records of its epoch without decoding them and
continues with the next sample. A damaged sample (or the rest of a damaged shard) is skipped and counted.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from rectflow.data.folder import UnusableImage, decode_image, fit

log = logging.getLogger(__name__)

SHARD_FORMAT = "rectflow.shards/1"
MANIFEST = "manifest.json"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # the member read as a sample's image, first found
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; other formats become PNG
CAPTION_FIELDS = ("caption", "text", "prompt")  # a .json member's caption, when there is no .txt
# what a truncated, corrupt or unreachable shard raises while it is read
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)
# members of precomputed samples (rectflow cache): the latent and the text features, float16 .npy
LATENT, CONTEXT, POOLED = "latent.npy", "context.npy", "pooled.npy"
SHUFFLE_BUFFER = 1000
EMPTY_EPOCHS = 3  # a stream finding no usable sample in this many epochs in a row stops the run  # samples each stream holds for shuffling (WebDataset's usual size)


class ShardError(ValueError):
    """A shard set that cannot be streamed as asked (no shards, fewer shards than streams)."""


def split_key(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension): the key keeps the directory and the base name up to its first
    dot (WebDataset's rule), the extension is the rest, lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def open_url(url: str):
    """A binary file object for a local path or an fsspec URL (s3://, gs://, https://, ...)."""
    if "://" in url and not url.startswith("file://"):
        import fsspec  # only remote shard sets need it
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def iter_tar(url: str, expected: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a shard, read as a stream (no seeking: URLs work). Raises one of
    SHARD_ERRORS where the shard is damaged; the sample cut short by it is not yielded. expected: the manifest's
    sample count, which catches a tar cut at a member boundary (tarfile reads that as a clean end): the shard raises
    and its last sample, maybe missing members, is held back."""
    count = 0
    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if not ext or k.startswith("__"):
                continue
            data = tar.extractfile(member).read()
            if key is not None and k != key:
                yield key, files
                count, files = count + 1, {}
            key, files[ext] = k, data
        if key is not None and expected is not None and count + 1 < expected:
            raise tarfile.ReadError(f"the shard ends after {count + 1} of its {expected} samples (truncated)")
        if key is not None:
            yield key, files


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept; several ranges multiply)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [u for i in range(lo, hi + 1) for u in expand_braces(f"{head}{i:0{width}d}{tail}")]


def is_shard_spec(spec: str) -> bool:
    """Whether a data spec names shards: 'shards:...', a .tar path or pattern, or a folder of them."""
    if spec.startswith("shards:") or re.search(r"\.tar(\b|$)", spec):
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob("*.tar")))


def read_manifest(folder: str) -> dict | None:
    """A shard folder's manifest (local or fsspec URL), or None when it has none."""
    url = folder.rstrip("/") + "/" + MANIFEST
    try:
        with open_url(url) as f:
            manifest = json.loads(f.read())
    except (OSError, FileNotFoundError):
        return None
    except json.JSONDecodeError as err:
        raise ShardError(f"{url}: not valid JSON ({err})") from None
    if manifest.get("format") != SHARD_FORMAT or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{url}: expected a {SHARD_FORMAT!r} manifest with a 'shards' list")
    return manifest


def resolve(spec: str) -> tuple[list[str], dict | None]:
    """The shard URLs of a spec and its manifest (None when it has none)."""
    spec = spec.removeprefix("shards:")
    local = Path(spec).expanduser()
    if "{" in spec:
        return expand_braces(spec), None
    if spec.endswith(".tar"):
        return [spec], None
    manifest = read_manifest(str(local) if local.exists() else spec)
    if manifest is not None:
        base = str(local) if local.exists() else spec.rstrip("/")
        return [f"{base}/{s['name']}" for s in manifest["shards"]], manifest
    if local.is_dir():
        tars = sorted(str(p) for p in local.glob("*.tar"))
        if tars:
            return tars, None
    raise ShardError(f"no shards at {spec!r}: expected a folder with {MANIFEST} or .tar files, a .tar, or a brace "
                     f"pattern such as data-{{000000..000009}}.tar")


# ---- samples


def npy_member(t: torch.Tensor) -> bytes:
    """A tensor as .npy bytes (what WebDataset's "npy" decoder and numpy.load read)."""
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def _npy(data: bytes) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    except (ValueError, OSError, EOFError) as err:
        raise UnusableImage(f"a .npy member does not load ({err})") from None


def decode_cached(key: str, files: dict[str, bytes]) -> dict:
    """A precomputed sample (rectflow cache): latent [C, h, w] float32, caption, and the text features when
    cached (context [L, D], pooled [P])."""
    item = {"latent": _npy(files[LATENT]).float(), "caption": files.get("txt", b"").decode("utf-8", "replace"),
            "meta": {"key": key}}
    if CONTEXT in files and POOLED in files:
        item["context"], item["pooled"] = _npy(files[CONTEXT]).float(), _npy(files[POOLED]).float()
    return item


def decode_sample(key: str, files: dict[str, bytes], resolution: int, crop: str = "center",
                  default_caption: str = "") -> dict:
    """A sample's members -> a data-set item (image [3, R, R] in [-1, 1], caption, meta; or a precomputed sample's
    latent and text features, decode_cached); UnusableImage if not."""
    if LATENT in files:
        return decode_cached(key, files)
    ext = next((e for e in IMAGE_MEMBERS if e in files), None)
    if ext is None:
        raise UnusableImage(f"no image member ({', '.join(IMAGE_MEMBERS)}) among {sorted(files)}")
    if not files[ext]:
        raise UnusableImage("empty file")
    info = {}
    if "json" in files:
        try:
            info = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UnusableImage("the .json member is not valid JSON") from None
        info = info if isinstance(info, dict) else {}
    image, _ = decode_image(io.BytesIO(files[ext]), "." + ext, draft=(resolution, resolution))
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = next((info[k] for k in CAPTION_FIELDS if isinstance(info.get(k), str)), default_caption).strip()
    array = torch.from_numpy(np.array(fit(image, resolution, crop), dtype=np.uint8)).permute(2, 0, 1)
    return {"image": array.float().div(127.5).sub(1.0), "caption": caption, "meta": {"key": key}}


@dataclass
class Position:
    """Where a stream is: its epoch, the records drawn from its shuffle buffer in that epoch, and what it skipped."""

    epoch: int = 0
    drawn: int = 0
    bad_samples: int = 0
    bad_shards: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class ShardSet:
    """The shards of a data spec at a resolution: streamed (stream()), never indexed; `streaming` says so."""

    streaming = True

    def __init__(self, spec: str, resolution: int, seed: int = 0, crop: str = "center", default_caption: str = "",
                 shuffle_buffer: int = SHUFFLE_BUFFER):
        self.spec, self.resolution, self.seed = spec, resolution, seed
        self.crop, self.default_caption, self.shuffle_buffer = crop, default_caption, int(shuffle_buffer)
        self.urls, self.manifest = resolve(spec)
        if not self.urls:
            raise ShardError(f"{spec}: the shard list is empty")
        # each shard's sample count where a manifest says (a tar cut at a member boundary is caught by it)
        self.expected = [s.get("samples") for s in self.manifest["shards"]] if self.manifest else [None] * len(
            self.urls)

    @property
    def fingerprint(self) -> str:
        """What a stream position is relative to: the shard list (and manifest hashes), the seed and the buffer."""
        shards = self.manifest["shards"] if self.manifest else self.urls
        return hashlib.sha256(json.dumps([shards, self.seed, self.shuffle_buffer], sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]

    @property
    def cached(self) -> dict | None:
        """What a precomputed shard set (rectflow cache) was encoded with ({"autoencoder", "text_encoder",
        "resolution"}), or None for images."""
        return (self.manifest or {}).get("cache")

    def __len__(self) -> int:
        """Samples per epoch (from the manifest; 0 when unknown)."""
        return int(self.manifest.get("samples", 0)) if self.manifest else 0

    def stream(self, index: int = 0, count: int = 1, position: Position | None = None) -> "ShardStream":
        return ShardStream(self, index, count, position)

    def decode(self, key: str, files: dict[str, bytes]) -> dict:
        return decode_sample(key, files, self.resolution, self.crop, self.default_caption)

    def usable(self, shards=None) -> Iterator[tuple[tuple[str, dict[str, bytes]], dict]]:
        """((key, members), decoded item) of every usable sample in shard order (no shuffling) of the given shard
        indices (default: all); unusable samples and the rest of a damaged shard are skipped with a warning."""
        for u in range(len(self.urls)) if shards is None else shards:
            try:
                for key, files in iter_tar(self.urls[u], self.expected[u]):
                    try:
                        yield (key, files), self.decode(key, files)
                    except UnusableImage as err:
                        log.warning("%s: sample %s skipped (%s)", self.urls[u], key, err)
            except SHARD_ERRORS as err:
                log.warning("shard %s is damaged (%s); skipping the rest of it", self.urls[u], err)

    def preview(self, n: int) -> list[dict]:
        """The first n usable samples in shard order (sample-grid prompts)."""
        return [item for _, item in itertools.islice(self.usable(), n)]


class ShardItems(torch.utils.data.Dataset):
    """Every usable sample of a small shard set (a validation split), held in memory and indexed."""

    def __init__(self, spec: str, resolution: int, crop: str = "center", default_caption: str = "",
                 shuffle_buffer: int = 0):
        self.shards = ShardSet(spec, resolution, crop=crop, default_caption=default_caption)
        samples = list(self.shards.usable())
        self.records, self.captions = [r for r, _ in samples], [item["caption"] for _, item in samples]
        if not self.records:
            raise ShardError(f"{spec}: no usable samples")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.shards.decode(*self.records[i])


class ShardStream:
    """Stream `index` of `count` over a shard set: endless, deterministic in (seed, index, position)."""

    def __init__(self, shards: ShardSet, index: int, count: int, position: Position | None = None):
        if count > len(shards.urls):
            raise ShardError(f"{shards.spec}: {len(shards.urls)} shards for {count} streams (processes x DataLoader "
                             f"workers); each stream needs a shard of its own: write smaller shards (rectflow shards "
                             f"--shard-size) or use fewer workers")
        self.shards, self.index, self.count = shards, index, count
        self.start = position or Position()
        self.position = Position(**self.start.to_dict())

    def _epoch_records(self, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """This stream's records of one epoch: its shards of the epoch's seeded order, each read to its end or its
        damage."""
        urls = self.shards.urls
        order = torch.randperm(len(urls), generator=torch.Generator().manual_seed(
            _seed(self.shards.seed, "shard-order", epoch))).tolist()
        for u in order[self.index::self.count]:
            try:
                yield from iter_tar(urls[u], self.shards.expected[u])
            except SHARD_ERRORS as err:
                self.position.bad_shards += 1
                if not self._replaying:
                    log.warning("shard %s is damaged (%s: %s); skipping the rest of it", urls[u],
                                type(err).__name__, err)

    def _epoch(self, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """One epoch's records through the seeded shuffle buffer, drained at the end."""
        size = self.shards.shuffle_buffer
        if size <= 1:  # no shuffling: shard order, then member order
            yield from self._epoch_records(epoch)
            return
        rng = random.Random(_seed(self.shards.seed, "shard-shuffle", epoch, self.index))
        buffer = []
        for record in self._epoch_records(epoch):
            if len(buffer) < size:
                buffer.append(record)
                continue
            j = rng.randrange(size)
            buffer[j], record = record, buffer[j]
            yield record
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self) -> Iterator[dict]:
        """Decoded samples from the start position on; each item's meta has its key, and self.position is the
        position after it."""
        epoch, skip = self.start.epoch, self.start.drawn
        self.position = Position(**self.start.to_dict())
        barren = 0  # epochs in a row in which this stream found no usable sample
        while True:
            self._replaying, good = skip > 0, 0
            for n, (key, files) in enumerate(self._epoch(epoch), 1):
                if n <= skip:  # consumed before the resume: re-read (the buffer refills the same way), not decoded
                    if n == skip:  # the counters as they were then (the replay met the same damaged shards)
                        self._replaying = False
                        self.position = Position(**{**self.start.to_dict(), "epoch": epoch, "drawn": skip})
                    continue
                self.position.drawn = n
                try:
                    item = self.shards.decode(key, files)
                except UnusableImage as err:
                    self.position.bad_samples += 1
                    log.warning("sample %s: skipped (%s)", key, err)
                    continue
                good += 1
                yield item
            barren = 0 if good or skip else barren + 1
            if barren:  # its shards of this epoch were all unreadable: the next epoch deals it others
                log.warning("stream %d of %d: no usable sample in its shards of epoch %d", self.index, self.count,
                            epoch)
            if barren >= EMPTY_EPOCHS:
                raise ShardError(f"stream {self.index} of {self.count}: no usable sample in {barren} epochs in a "
                                 f"row; the shards of {self.shards.spec} are unreadable (rectflow shards --check)")
            epoch, skip = epoch + 1, 0
            self.position.epoch, self.position.drawn = epoch, 0


def _seed(seed: int, purpose: str, *parts: int) -> int:
    digest = hashlib.sha256("/".join(map(str, (seed, purpose, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata (mtime 0, no owner), so the same samples give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[tuple[str, dict[str, bytes], dict]], out: str | Path, shard_size: int = 1000,
                 source: str = "", extra: dict | None = None) -> dict:
    """Write (key, {extension: bytes}, info) samples into out/shard-NNNNNN.tar of shard_size samples each, then
    out/manifest.json (counts, bytes, sha256 per shard); each file appears whole (written aside, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, tar, name, count, total = [], None, None, 0, 0

    def close():
        tar.close()
        tmp = out / f".{name}.tmp"
        data = tmp.read_bytes()
        tmp.replace(out / name)
        shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    for key, files, _ in samples:
        if tar is None:
            name, count = f"shard-{len(shards):06d}.tar", 0
            tar = tarfile.open(out / f".{name}.tmp", "w", format=tarfile.USTAR_FORMAT)
        for ext, data in files.items():
            _tar_member(tar, f"{key}.{ext}", data)
        count, total = count + 1, total + 1
        if count == shard_size:
            close()
            tar = None
    if tar is not None:
        close()
    manifest = {"format": SHARD_FORMAT, "source": source, "samples": total, "shards": shards, **(extra or {})}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / MANIFEST)
    return manifest


def verify(folder: str | Path) -> list[str]:
    """The problems of a written shard folder against its manifest (missing files, sizes, hashes); [] when sound."""
    folder = Path(folder)
    manifest = read_manifest(str(folder))
    if manifest is None:
        return [f"{folder}: no {MANIFEST}"]
    problems = []
    for s in manifest["shards"]:
        path = folder / s["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        data = path.read_bytes()
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            problems.append(f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}...; the "
                            f"manifest says {s['bytes']} bytes, {s['sha256'][:12]}...")
    return problems


def image_member(path: Path) -> tuple[str, bytes, tuple[int, int]]:
    """An image file as a shard member: (extension, bytes, (width, height)); JPEG, PNG and WebP are kept byte for
    byte (under their true extension), other formats are re-encoded as PNG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        fmt, size = image.format, image.size
        if fmt in KEPT_FORMATS:
            return KEPT_FORMATS[fmt], data, size
        rgb, _ = decode_image(io.BytesIO(data), path.suffix)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue(), rgb.size


def png_member(image: torch.Tensor) -> bytes:
    """A [3, H, W] image in [-1, 1] as PNG bytes."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def folder_samples(dataset) -> Iterator[tuple[str, dict[str, bytes], dict]]:
    """The usable images of an ImageFolderDataset (scanned: broken files already left out) as shard samples: the
    image file as it is (see image_member), its caption as .txt and .json with the original size and path."""
    for i, (path, caption) in enumerate(zip(dataset.paths, dataset.captions)):
        try:
            ext, data, (w, h) = image_member(path)
        except (OSError, UnusableImage) as err:  # changed since the scan
            log.warning("%s became unusable after the scan (%s); left out", path, err)
            continue
        info = {"caption": caption, "width": w, "height": h, "source": path.relative_to(dataset.root).as_posix()}
        yield f"{i:08d}", {ext: data, "txt": caption.encode(), "json": json.dumps(info).encode()}, info


def dataset_samples(dataset, count: int) -> Iterator[tuple[str, dict[str, bytes], dict]]:
    """The first `count` items of a built-in data set as shard samples (PNG images at its resolution)."""
    for i in range(count):
        item = dataset[i]
        _, h, w = item["image"].shape
        info = {"caption": item["caption"], "width": w, "height": h, "meta": item["meta"]}
        yield (f"{i:08d}", {"png": png_member(item["image"]), "txt": item["caption"].encode(),
                            "json": json.dumps(info).encode()}, info)

"""Rebuild rectflow/assets/emoji.npz from the Noto Color Emoji font.

    apt-get install fonts-noto-color-emoji        # Debian / Ubuntu; or pass --font
    pip install emoji                             # CLDR names for every sequence (dev extra of rectflow)
    python scripts/build_emoji.py --size 32 --out rectflow/assets/emoji.npz

Candidates are the fully-qualified emoji and the components of the `emoji` package. A candidate is kept when the
font draws it as one glyph (raqm layout: the sequence's advance equals one glyph's) with visible pixels, and its
render differs from every glyph kept before it; ties among identical renders go to the older emoji (then the
shorter name), so "France" wins over "Clipperton Island". Glyphs are drawn at the font's bitmap size (109) on
white, centred in a square canvas and downsampled with a Lanczos filter. Order: by kind
(single, keycap, flag, zwj, skin_tone), then by code points, so the shipped order is stable across rebuilds.
"""
from __future__ import annotations

import argparse
import hashlib
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
BITMAP_SIZE = 109          # the only size the CBDT bitmaps are stored at
KINDS = ("single", "keycap", "flag", "zwj", "skin_tone")
SKIN_TONES = range(0x1F3FB, 0x1F400)
VS16, ZWJ, KEYCAP = "\ufe0f", "\u200d", "\u20e3"


def kind_of(sequence: str) -> str:
    """'single', 'keycap', 'flag', 'zwj' or 'skin_tone' for an emoji string."""
    cps = [c for c in sequence if c != VS16]
    if len(cps) == 1:
        return "single"
    if any(ord(c) in SKIN_TONES for c in cps):
        return "skin_tone"
    if KEYCAP in cps:
        return "keycap"
    if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in cps) or any(0xE0020 <= ord(c) <= 0xE007F for c in cps):
        return "flag"
    return "zwj"


def caption_of(sequence: str, cldr: str, kind: str) -> str:
    """Caption from the emoji package's CLDR short name (':thumbs_up:' -> 'thumbs up').

    Flags get CLDR's 'flag: ' prefix, which the package drops (':United_States:' -> 'flag: United States').
    """
    name = cldr.strip(":").replace("_", " ")
    if kind == "flag" and not name.lower().startswith("flag"):
        name = f"flag: {name}"
    return name


def unicode_name(sequence: str) -> str:
    """The Unicode character name of a single code point (VS16 ignored), '' for sequences."""
    cps = [c for c in sequence if c != VS16]
    return unicodedata.name(cps[0], "").lower() if len(cps) == 1 else ""


def candidates() -> list[dict]:
    """Fully-qualified emoji and components from the emoji package, with name, kind and version."""
    import emoji  # dev dependency: the name source for sequences

    wanted = {emoji.STATUS["fully_qualified"], emoji.STATUS["component"]}
    out = []
    for sequence, data in emoji.EMOJI_DATA.items():
        if data["status"] in wanted:
            kind = kind_of(sequence)
            out.append({"sequence": sequence, "kind": kind, "version": float(data["E"]),
                        "caption": caption_of(sequence, data["en"], kind), "unicode_name": unicode_name(sequence)})
    return out


def render(font: ImageFont.FreeTypeFont, sequence: str) -> Image.Image:
    """The glyph at full bitmap size on white, centred in a square canvas."""
    left, top, right, bottom = font.getbbox(sequence)
    side = max(right - left, bottom - top)
    canvas = Image.new("RGB", (side, side), "white")
    offset = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(offset, sequence, font=font, embedded_color=True)
    return canvas


def build(font_path: str, size: int) -> dict[str, np.ndarray]:
    """Render every candidate the font draws as one distinct glyph; arrays ready for np.savez_compressed."""
    font = ImageFont.truetype(font_path, BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
    advance = font.getlength("\U0001F600")
    ranked = sorted(candidates(), key=lambda c: (c["version"], len(c["caption"]), c["caption"]))
    kept, seen = [], set()
    for cand in ranked:
        s = cand["sequence"]
        if abs(font.getlength(s) - advance) > 1:  # not ligated: drawn as several glyphs
            continue
        left, top, right, bottom = font.getbbox(s)
        if bottom - top < 8:  # no bitmap: code point newer than the font
            continue
        canvas = render(font, s)
        digest = hashlib.sha1(canvas.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        kept.append({**cand, "image": np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS))})
    kept.sort(key=lambda c: (KINDS.index(c["kind"]), [ord(ch) for ch in c["sequence"]]))
    return {
        "images": np.stack([c["image"] for c in kept]).astype(np.uint8),
        "captions": np.array([c["caption"] for c in kept]),
        "sequences": np.array([" ".join(f"{ord(ch):04X}" for ch in c["sequence"]) for c in kept]),
        "kinds": np.array([c["kind"] for c in kept]),
        "unicode_names": np.array([c["unicode_name"] for c in kept]),
        "versions": np.array([c["version"] for c in kept], dtype=np.float32),
        "source": np.array(_font_version(font_path)),
    }


def _font_version(font_path: str) -> str:
    """The font's version string and the emoji package version, recorded in the file."""
    import emoji
    from fontTools.ttLib import TTFont

    return f"{TTFont(font_path)['name'].getDebugName(5)}; emoji package {emoji.__version__}"


def main(argv: list[str] | None = None) -> int:
    """Build and write the glyph file; print what was kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", default=FONT, help="path to NotoColorEmoji.ttf")
    parser.add_argument("--size", type=int, default=32, help="side of the stored glyphs in pixels")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "rectflow/assets/emoji.npz"))
    args = parser.parse_args(argv)
    if not Path(args.font).is_file():
        parser.error(f"font not found: {args.font} (apt-get install fonts-noto-color-emoji, or pass --font)")
    arrays = build(args.font, args.size)
    np.savez_compressed(args.out, **arrays)
    counts = {k: int((arrays["kinds"] == k).sum()) for k in KINDS}
    print(f"wrote {args.out}: {len(arrays['captions'])} glyphs at {args.size}x{args.size} {counts}, "
          f"{Path(args.out).stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

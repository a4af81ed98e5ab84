"""A contact sheet of real queries and their top 5: what `stbir-infer query` answers, as a picture.

    python benchmarks/search_sheet.py --model runs/real8k/export --index runs/real8k/index-fp32 \
        --out docs/search_sheet.png --query "a dog running on grass" \
        --query "children playing in the snow" --query "a man riding a bike on a dirt road" \
        --query "a black dog running in the water|runs/real8k/data/photos/testA/1131155939_b4b457b05e_0.png" \
        --query "a climber on a rock|runs/real8k/data/photos/testA/111497985_38e9f88856_0.png"

(the sheet in docs/real-photos.md: `make real` first).

Each ``--query`` is ``TEXT`` or ``TEXT|SKETCH`` (a sketch image path; TEXT may be empty for a
sketch-only query). One row a query: the sketch (when there is one) and the text, then the five
best photos with their scores, through the torch-free runtime (``stbir_infer.Searcher``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CELL = 150
LABEL = 220
TOP = 5


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def sheet(searcher, queries: list[tuple[str, str | None]]) -> Image.Image:
    font, small = _font(15), _font(13)
    out = Image.new("RGB", (LABEL + TOP * CELL, len(queries) * (CELL + 24)), "white")
    draw = ImageDraw.Draw(out)
    for row, (text, sketch) in enumerate(queries):
        y = row * (CELL + 24)
        hits = searcher.query(sketch=sketch, text=text or None, top_k=TOP)
        x = 6
        if sketch:
            im = Image.open(sketch).convert("RGB")
            im.thumbnail((90, 90))
            out.paste(im, (x, y + 8))
            draw.rectangle([x - 1, y + 7, x + im.width, y + 8 + im.height], outline="gray")
            ty = y + 104
        else:
            ty = y + 30
        mode = "sketch+text" if sketch and text else "sketch" if sketch else "text"
        draw.text((x, ty - 22 if not sketch else ty), mode, fill="gray", font=small)
        for k, line in enumerate(_wrap(f'"{text}"' if text else "", 24)[:3]):
            draw.text((x, (ty - 4 if not sketch else ty + 16) + 18 * k), line, fill="black",
                      font=font)
        for i, hit in enumerate(hits):
            im = Image.open(hit.path).convert("RGB")
            im.thumbnail((CELL - 8, CELL - 8))
            cx = LABEL + i * CELL + (CELL - im.width) // 2
            out.paste(im, (cx, y + 4 + (CELL - 8 - im.height) // 2))
            draw.text((LABEL + i * CELL + 6, y + CELL - 2), f"{i + 1}. {hit.score:.3f}",
                      fill="black", font=small)
    return out


def main(argv=None) -> int:
    from stbir_infer import Searcher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "search_sheet.png")
    ap.add_argument("--query", action="append", required=True, help="TEXT or TEXT|SKETCH")
    args = ap.parse_args(argv)
    queries = []
    for q in args.query:
        text, _, sketch = q.partition("|")
        queries.append((text.strip(), sketch.strip() or None))
    image = sheet(Searcher(args.model, args.index), queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=192).save(args.out, optimize=True)
    print(f"{args.out} ({args.out.stat().st_size // 1024} KB, {len(queries)} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

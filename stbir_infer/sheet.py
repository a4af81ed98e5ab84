"""Contact sheets: one row per query (its sketch, its caption, the top hits) in a PNG a person
can look at. PIL only."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from stbir_infer.preprocess import ImageDecodeError, open_image

CELL = 128
CAPTION_W = 220


def _thumb(source, channels: int = 3) -> Image.Image:
    try:
        img = open_image(source, channels).convert("RGB")
    except ImageDecodeError:
        img = Image.new("RGB", (CELL, CELL), (200, 200, 200))
    return ImageOps.pad(img, (CELL, CELL), color=(255, 255, 255))


def _wrap(text: str, width: int = 26) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def contact_sheet(rows: list[dict], path: str | Path, top_k: int = 5) -> Path:
    """``rows``: dicts with ``sketch`` (path or None), ``text`` (str or None), ``hits``
    (list of objects with ``path`` and ``score``) and optionally ``target`` (the right photo's
    path, framed in green where it appears among the hits)."""
    path = Path(path)
    width = CELL + CAPTION_W + top_k * (CELL + 8) + 8
    height = len(rows) * (CELL + 24) + 8
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for r, row in enumerate(rows):
        y = 8 + r * (CELL + 24)
        if row.get("sketch"):
            sheet.paste(_thumb(row["sketch"], 1), (8, y))
        for i, line in enumerate(_wrap(row.get("text") or "(no text)")[:6]):
            draw.text((CELL + 16, y + 4 + 16 * i), line, fill="black", font=font)
        for k, hit in enumerate(row["hits"][:top_k]):
            x = CELL + CAPTION_W + k * (CELL + 8)
            sheet.paste(_thumb(hit.path), (x, y))
            target = row.get("target")
            if target is not None and Path(hit.path).resolve() == Path(target).resolve():
                draw.rectangle([x - 3, y - 3, x + CELL + 2, y + CELL + 2], outline=(0, 170, 0), width=4)
            draw.text((x, y + CELL + 4), f"#{k + 1}  {hit.score:.3f}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path

"""Contact sheets: one row per query, the right photo framed in green."""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from stbir_infer.sheet import CAPTION_W, CELL, contact_sheet


@dataclass
class FakeHit:
    path: str
    score: float


def test_contact_sheet_layout_and_target_frame(tmp_path):
    photos = []
    for i, colour in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"p{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        photos.append(str(p))
    sketch = tmp_path / "s.png"
    Image.new("L", (40, 40), 255).save(sketch)
    hits = [FakeHit(p, 0.9 - 0.1 * i) for i, p in enumerate(photos)]
    out = contact_sheet([{"sketch": str(sketch), "text": "red", "hits": hits, "target": photos[1]},
                         {"sketch": None, "text": None, "hits": hits[:1]}], tmp_path / "sheet.png", top_k=3)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (2 * (CELL + 24) + 8, CELL + CAPTION_W + 3 * (CELL + 8) + 8, 3)
    y = 8
    second = CELL + CAPTION_W + (CELL + 8)
    first = CELL + CAPTION_W
    assert tuple(img[y - 2, second + 10]) == (0, 170, 0)  # frame around the target (rank 2)
    assert tuple(img[y - 2, first + 10]) == (255, 255, 255)  # none around rank 1
    assert tuple(img[y + CELL // 2, first + CELL // 2]) == (255, 0, 0)  # rank 1 thumbnail is the red photo

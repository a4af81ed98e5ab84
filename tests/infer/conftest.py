"""Fixtures of the stbir_infer tests (the export comes from tests/conftest.py's ``small_export``)."""

from __future__ import annotations

import shutil

import pytest
from infer_helpers import make_photos
from PIL import Image


@pytest.fixture(scope="module")
def export_dir(small_export):
    return small_export


@pytest.fixture(scope="module")
def encoders(export_dir):
    from stbir_infer.encoders import Encoders

    return Encoders(export_dir, threads=1)


@pytest.fixture()
def gallery(tmp_path):
    """A folder with 6 photos (2 in a subfolder), a corrupt image, a text file and a duplicate."""
    photos = tmp_path / "photos"
    items = make_photos(photos, ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "sub/f.png"])
    Image.open(photos / "a.png").save(photos / "full.jpg", quality=90)
    data = (photos / "full.jpg").read_bytes()
    (photos / "full.jpg").unlink()
    (photos / "corrupt.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (photos / "notes.txt").write_text("not a photo\n")
    shutil.copy(photos / "a.png", photos / "sub" / "a_copy.png")
    return photos, items

"""Photo-caption pairs for `stbir-train pretrain`, from either layout, checked line by line.

- a captions CSV with a header: ``filename,caption`` (seed 003) or ``image,caption`` (Flickr8k);
  several lines per photo are several pairs; photos live in one images folder;
- the seed layout: per category a ``name<TAB>text`` file and its photo folder (``data.categories``).

Every problem is one ``DataError`` naming the file and the line: no header, an unknown photo,
an empty caption, a photo that does not decode.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from stbir_infer.preprocess import ImageDecodeError, open_image
from stbir_train.errors import DataError
from stbir_train.manifest import read_tab_lines

HEADERS = (("filename", "caption"), ("image", "caption"))


@dataclass
class Pairs:
    """Photos (paths) and captions; ``owner[j]`` is the index of caption j's photo."""

    photos: list[Path]
    captions: list[str]
    owner: list[int]
    where: list[str]  # "file:line" of each photo's first caption, for decode errors


def _add(pairs: Pairs, index: dict, photo: Path, caption: str, where: str) -> None:
    if photo not in index:
        index[photo] = len(pairs.photos)
        pairs.photos.append(photo)
        pairs.where.append(where)
    pairs.captions.append(caption)
    pairs.owner.append(index[photo])


def read_csv_pairs(captions: Path, images: Path) -> Pairs:
    if not captions.is_file():
        raise DataError(f"{captions}: captions file not found")
    if not images.is_dir():
        raise DataError(f"{images}: images folder not found")
    try:
        text = captions.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{captions}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    names = tuple(h.strip().lower() for h in header or ())
    if names not in HEADERS:
        raise DataError(f"{captions}:1: expected a header 'filename,caption' or 'image,caption', "
                        f"got {','.join(header or []) or 'an empty file'!r}")
    pairs, index = Pairs([], [], [], []), {}
    for row in rows:
        line = rows.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(f"{captions}:{line}: expected 2 columns (name,caption), got {len(row)}")
        name, caption = row[0].strip(), " ".join(row[1].split())
        _check(captions, line, images, name, caption)
        _add(pairs, index, images / name, caption, f"{captions}:{line}")
    if not pairs.photos:
        raise DataError(f"{captions}: no photo-caption pairs after the header")
    return pairs


def read_layout_pairs(cfg) -> Pairs:
    """The seed layout's training photos and ``name<TAB>text`` lines of every category."""
    pairs, index = Pairs([], [], [], []), {}
    root = cfg.resolve(cfg.data.root)
    for name, cat in cfg.data.categories.items():
        text_file, folder = root / cat.train_text, root / cat.train_images
        if not text_file.is_file():
            raise DataError(f"{text_file}: captions file of category {name} not found")
        for line, photo, caption in read_tab_lines(text_file):
            caption = " ".join(caption.split())
            _check(text_file, line, folder, photo, caption)
            _add(pairs, index, folder / photo, caption, f"{text_file}:{line}")
    if not pairs.photos:
        raise DataError(f"{cfg.source or 'config'}: no photo-caption pairs (pretrain.captions is "
                        f"empty and data.categories lists none)")
    return pairs


def _check(file: Path, line: int, folder: Path, name: str, caption: str) -> None:
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{file}:{line}: bad image name {name!r}")
    if not (folder / name).is_file():
        raise DataError(f"{file}:{line}: image {name} not found in {folder}")
    if not caption:
        raise DataError(f"{file}:{line}: empty caption for {name}")


def decode_all(pairs: Pairs, channels: int = 3) -> list:
    """Decode every photo once (PIL images); an undecodable one names its first caption line."""
    out = []
    for photo, where in zip(pairs.photos, pairs.where):
        try:
            out.append(open_image(photo, channels))
        except ImageDecodeError as exc:
            raise DataError(f"{where}: {exc}") from None
    return out


__all__ = ["HEADERS", "Pairs", "decode_all", "read_csv_pairs", "read_layout_pairs"]

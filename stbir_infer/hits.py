"""One search result (``Hit``) and its JSON form; ``hits_of`` turns the index's (label, score)
pairs into them."""

from __future__ import annotations

from dataclasses import dataclass, field

from stbir_infer.paths import display, path_bytes_b64


@dataclass(frozen=True)
class Hit:
    """One result: ``path`` of the image, cosine ``score``, 1-based ``rank``; ``duplicates`` are
    other paths with the same content (indexed once).

    ``path`` is the name as the file system gave it (``os.fsdecode``: undecodable bytes are lone
    surrogates), so ``open(hit.path)`` opens the file; it may not print or encode as UTF-8.
    """

    path: str
    score: float
    rank: int
    duplicates: tuple[str, ...] = field(default=())
    same_file: bool | None = None  # with an example photo: this hit holds that very file content

    def to_dict(self) -> dict:
        """JSON-safe: ``path`` and ``duplicates`` in display form (``paths.display``: valid UTF-8,
        undecodable bytes as ``\\xNN``, control characters escaped). Where a display form differs
        from the real name, ``path_bytes_b64`` (and ``duplicates_bytes_b64``, one per duplicate)
        give the exact bytes of the name, base64-encoded, to open the file with."""
        d = {"rank": self.rank, "score": self.score, "path": display(self.path),
             "duplicates": [display(p) for p in self.duplicates]}
        if self.same_file is not None:
            d["same_file"] = self.same_file
        if d["path"] != self.path:
            d["path_bytes_b64"] = path_bytes_b64(self.path)
        if d["duplicates"] != list(self.duplicates):
            d["duplicates_bytes_b64"] = [path_bytes_b64(p) for p in self.duplicates]
        return d


def hits_of(idx, found, where=None, same: str | None = None) -> list[Hit]:
    """``found``: (label, score) pairs of a GalleryIndex ``idx``, best first. A hit's path is the
    first of the label's files that passes ``where``; ``same`` (an example photo's sha256, ""
    when unknown, None without a photo) sets ``same_file``."""
    hits = []
    for rank, (label, score) in enumerate(found, 1):
        paths = idx.paths_where(label, where) or ["?"]
        hits.append(Hit(path=paths[0], score=score, rank=rank, duplicates=tuple(paths[1:]),
                        same_file=None if same is None else idx.items.get(label) == same))
    return hits


__all__ = ["Hit", "hits_of"]

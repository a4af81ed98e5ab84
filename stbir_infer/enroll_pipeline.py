"""Enroll's decode -> preprocess -> encode -> index pipeline, and the seconds each stage took.

``enroll`` groups the new contents by sha256 and batches them; here worker threads read, verify
and decode the next batches while the caller encodes this one. Threads, not processes: PIL
decodes and resizes, and hashlib hashes, with the GIL released, and a thread hands its array over
without a copy (``benchmarks/enroll.py`` measures both). At most ``ahead`` batches are
decoded ahead of the one being encoded, so memory stays at (``ahead`` + 1) batches of pixels
whatever the folder's size; each image is bounded by ``preprocess``'s own limits.

Stages (``Stages``, seconds; ``EnrollReport.stages``, ``stbir-infer enroll --json``):

    decode      read the file, check it still hashes to its content's sha256, decode the pixels
                (a JPEG at reduced scale where ``preprocess`` allows it)
    preprocess  resize, crop, normalise
    encode      the image graph
    index       hnswlib add and the file records
    wait        the encoder sat idle waiting for decoded images (decoding was the bottleneck)

decode and preprocess run on the workers and are summed over them, so together they may exceed
the wall time; encode, index and wait are the calling thread's.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

from stbir_infer import preprocess as _pre
from stbir_infer.edges import gallery_sketch
from stbir_infer.errors import NonFiniteEmbeddingError
from stbir_infer.scan import opened_if_sha, stamp

AHEAD = 2  # batches decoded ahead of the one being encoded


@dataclass
class Stages:
    """Seconds per stage (see the module docstring)."""

    decode: float = 0.0
    preprocess: float = 0.0
    encode: float = 0.0
    index: float = 0.0
    wait: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


STAGES = tuple(f.name for f in fields(Stages))


def default_workers(threads: int | None = None) -> int:
    """Decode workers: one per core (or per ``threads``), at most 8."""
    return max(1, min(int(threads or os.cpu_count() or 1), 8))


def decoded_batches(batches: Iterable[Sequence], spec: dict, stages: Stages, *, workers: int,
                    ahead: int = AHEAD, sketch_spec: dict | None = None
                    ) -> Iterator[tuple[Sequence, list]]:
    """For each batch of (sha256, files) pairs, in order: (the batch, one outcome per pair).

    An outcome is (float32 pixels [C, S, S], or the exception saying why not, or None when no
    file still holds the content; the files whose bytes changed since they were hashed; with
    ``sketch_spec``, the sketch tower's pixels of the photo's pseudo-sketch for the edge
    gallery, else None). Each
    batch is split into one chunk per worker; while the caller holds one batch, the next
    ``ahead`` are being decoded (never more), so the workers keep busy while the caller encodes."""
    _pre.check_spec(spec)  # an export's bad value stops here, once, not at every image
    if sketch_spec is not None:
        _pre.check_spec(sketch_spec)
    workers = max(1, int(workers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enroll-decode")
    todo = iter(batches)
    queued: deque = deque()

    def submit(batch):
        per_chunk = max(1, -(-len(batch) // workers))
        chunks = [batch[i:i + per_chunk] for i in range(0, len(batch), per_chunk)]
        queued.append((batch, [pool.submit(_decode_chunk, chunk, spec, sketch_spec)
                               for chunk in chunks]))

    try:
        for batch in todo:
            submit(batch)
            if len(queued) > ahead:
                break
        while queued:
            batch, futures = queued.popleft()
            t0 = time.perf_counter()
            outcomes = []
            for f in futures:
                results, t_decode, t_pre = f.result()
                outcomes += results
                stages.decode += t_decode
                stages.preprocess += t_pre
            stages.wait += time.perf_counter() - t0
            yield batch, outcomes
            nxt = next(todo, None)  # the caller is done with this batch: one more may start
            if nxt is not None:
                submit(nxt)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(chunk: Sequence, spec: dict, sketch_spec: dict | None = None
                  ) -> tuple[list, float, float]:
    """The outcomes of one chunk, and the seconds it spent decoding and preprocessing (the
    pseudo-sketch's extraction counts as preprocessing)."""
    out, t_decode, t_pre = [], 0.0, 0.0
    for sha, group in chunk:
        t0 = time.perf_counter()
        img, changed = _read_and_decode(sha, group, int(spec["channels"]), int(spec["size"]))
        t1 = time.perf_counter()
        sketch = None
        if isinstance(img, Image.Image):
            if sketch_spec is not None:
                try:
                    sketch = _pre.load(gallery_sketch(img), sketch_spec)  # as a drawn query
                except Exception:  # noqa: BLE001  the photo is indexed all the same (a zero row)
                    sketch = None
            try:
                img = _pre.preprocess(img, spec)
            except Exception as exc:  # noqa: BLE001  (e.g. a strip that resizes to nothing)
                img = exc
        out.append((img, changed, sketch))
        t_decode += t1 - t0
        t_pre += time.perf_counter() - t1
    return out, t_decode, t_pre


def _read_and_decode(sha: str, group: list, channels: int, size: int):
    """(decoded image, or the exception saying why not, or None; files that changed since they
    were hashed). The first file of the group whose bytes still hash to ``sha`` is decoded from
    that same open file, hashed as a stream (never read whole into memory); a write to it before
    the decode is done (its ctime moves) makes it a changed file, so the vector always matches
    the content recorded for it. A bad file never stops an enroll (e.g. ImageDecodeError)."""
    changed = []
    for c in group:
        with opened_if_sha(c.path, sha) as (f, before):
            if f is None:
                changed.append(c)
                continue
            try:
                img = _pre.open_image(f, channels, target=size)
                same = stamp(os.fstat(f.fileno())) == before
            except Exception as exc:  # noqa: BLE001
                return exc, changed
            if not same:
                changed.append(c)
                continue
            return img, changed
    return None, changed


def encode(encoders, pixels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Image vectors, and the rows the encoder could not embed (non-finite output)."""
    try:
        return encoders.encode_pixels("image", pixels), []
    except NonFiniteEmbeddingError as exc:
        return np.asarray(exc.vectors, np.float32), sorted(int(r) for r in exc.rows)


def remembered(exc: Exception) -> bool:
    """Whether a file that failed with ``exc`` is remembered as skipped (not read again while it
    and the export are unchanged): only a file that is not a decodable image. Anything else (out
    of memory, an I/O error, a bug) may pass another time, so the file is tried again."""
    return isinstance(exc, _pre.ImageDecodeError) and not exc.transient


def reason(exc: Exception) -> str:
    """Why a file is not indexed, as the report lists it."""
    if not isinstance(exc, _pre.ImageDecodeError):
        return f"cannot preprocess ({type(exc).__name__}: {exc})"
    msg = str(exc)
    if "cannot identify image file" in msg:
        return "not an image"
    return msg.split(": ", 1)[-1] if ": " in msg else msg


__all__ = ["AHEAD", "STAGES", "Stages", "decoded_batches", "default_workers", "encode", "reason",
           "remembered"]

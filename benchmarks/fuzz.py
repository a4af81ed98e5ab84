"""Hostile inputs through the runtime: random and mutated images and strings, seeded and bounded.

Cases are image files (PNG, JPEG, GIF, TIFF, WebP, BMP; tiny, huge-declared, 1xN strips,
decompression bombs just under and over the pixel caps, 16-bit, truncated, bit-flipped, random
bytes behind a real header) and strings (lone surrogates, control characters, very long, deep
JSON). They go through the three doors a user or a client can open:

- the HTTP API (``App.handle``: multipart sketch, JSON base64 sketch, deep JSON, wrong JSON
  types, form text, and a GET of a random route),
- ``Searcher.query`` with each image as a sketch file, with and without the string as a text, and
  the string alone,
- ``Searcher.enroll`` of a gallery that grows by a batch of case files per round; after each
  round the index (in memory and reloaded from disk) must hold exactly the earlier entries (same
  sha256) plus the new case files that the enroll did not skip, each with its file's sha256.
  Queries and HTTP requests must leave the index's generation unchanged.

The first cases are the known killers (a 1 x 300000 PNG strip, a PNG header declaring
30000 x 30000, PNG / GIF / TIFF / 16-bit decompression bombs just under the runtime's 50 MP and
the web's 25 MP caps, a 100 MP bomb, a 7000 x 7000 JPEG), and they come back at random later.

Counted: Python tracebacks (any exception outside the runtime's error family, or any exception
out of ``App.handle``), HTTP statuses (500s), API answers that are not UTF-8 JSON, crashes (the
cases run in a child process; when it
dies, by a signal or the OOM killer, the parent counts the case and resumes a new child at the
next one, on the same gallery and index), and memory: the peak resident memory of each request
above its resident memory when it started (Linux ``/proc/self/clear_refs`` resets the peak before
each request; elsewhere only the process peak above the warmed-up baseline is measured, which
bounds it too), per door, and the process's peak above the baseline.

    python benchmarks/fuzz.py --cases 10000 [--seed 0] [--model EXPORT] [--files 10000]

``--files N`` also runs N crafted index cases and the crafted-graph cases of
``benchmarks/fuzz_files.py`` (issue 26: index.bin, meta.json and ONNX outputs an attacker wrote,
with their checksums recomputed); their counts are under ``files`` and ``graphs``.

tests/infer/test_fuzz.py runs the same code at a small size.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP")
PEAK_LIMIT_MB = 256
EXTENSIONS = ("png", "jpg", "gif", "tif", "webp", "bmp", "bin", "")


# -- case generators ----------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(w: int, h: int) -> bytes:
    """A well-formed PNG header declaring w x h pixels, with a tiny (wrong) data stream."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


_BOMBS: dict = {}


def png_bomb(w: int, h: int, color_type: int = 6, bit_depth: int = 8) -> bytes:
    """A valid PNG of w x h pixels of zeros (RGBA 8-bit by default): a few hundred KB of file
    that decodes to w * h * channels bytes. Built row by row (never the whole raw image)."""
    key = ("png", w, h, color_type, bit_depth)
    if key not in _BOMBS:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        row = b"\x00" * (1 + w * channels * bit_depth // 8)
        comp = zlib.compressobj(9)
        parts = [comp.compress(row) for _ in range(h)]
        parts.append(comp.flush())
        ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
        _BOMBS[key] = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                       + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))
    return _BOMBS[key]


def pil_bomb(fmt: str, w: int, h: int, mode: str, **save) -> bytes:
    """A w x h blank image saved by PIL (GIF / TIFF deflate / JPEG compress blank pixels well)."""
    key = (fmt, w, h, mode, tuple(sorted(save.items())))
    if key not in _BOMBS:
        from PIL import Image

        buf = io.BytesIO()
        Image.new(mode, (w, h), 0).save(buf, fmt, **save)
        _BOMBS[key] = buf.getvalue()
    return _BOMBS[key]


def _strip_png(w: int, h: int) -> bytes:
    return png_bomb(w, h, color_type=2)


# The known killers: every run starts with them (in this order), and they come back at random.
KILLERS = (
    ("strip 1x300000 png", lambda: _strip_png(1, 300_000)),
    ("strip 300000x1 png", lambda: _strip_png(300_000, 1)),
    ("declared 30000x30000 png", lambda: _png_declaring(30_000, 30_000)),
    ("bomb 7000x7000 rgba png", lambda: png_bomb(7000, 7000, 6)),          # 49 MP: under 50 MP
    ("bomb 4990x4990 rgba png", lambda: png_bomb(4990, 4990, 6)),          # 24.9 MP: under 25 MP
    ("bomb 7000x7000 16-bit png", lambda: png_bomb(7000, 7000, 0, 16)),
    ("bomb 4990x4990 16-bit rgba png", lambda: png_bomb(4990, 4990, 6, 16)),
    ("bomb 10000x10000 png", lambda: png_bomb(10_000, 10_000, 0)),         # 100 MP: over
    ("bomb 7000x7000 gif", lambda: pil_bomb("GIF", 7000, 7000, "P")),
    ("bomb 7000x7000 tiff", lambda: pil_bomb("TIFF", 7000, 7000, "RGBA",
                                             compression="tiff_adobe_deflate")),
    ("bomb 7000x7000 jpeg", lambda: pil_bomb("JPEG", 7000, 7000, "RGB")),
)


def _valid_image(rng: random.Random) -> bytes:
    from PIL import Image

    fmt = rng.choice(FORMATS)
    shape = rng.random()
    if shape < 0.15:
        long_ok = fmt in ("PNG", "GIF", "BMP", "TIFF")
        w, h = 1, rng.choice([2000, 50_000, 300_000]) if long_ok else 2000
    elif shape < 0.3:
        w, h = rng.choice([2000, 50_000]) if fmt in ("PNG", "GIF", "BMP") else 2000, 1
    else:
        w, h = rng.randint(1, 300), rng.randint(1, 300)
    if rng.random() < 0.5:
        w, h = h, w
    mode = rng.choice(["RGB", "L", "RGBA", "P", "1", "CMYK", "LA", "I;16"])
    if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
        mode = "RGB"
    if fmt == "GIF" and mode not in ("P", "L"):
        mode = "P"
    if fmt == "WEBP" and mode not in ("RGB", "RGBA"):
        mode = "RGB"
    if fmt == "BMP" and mode not in ("RGB", "L", "P", "1"):
        mode = "RGB"
    if fmt == "PNG" and mode == "CMYK":
        mode = "RGB"
    limit = {"WEBP": 16383, "GIF": 65535, "JPEG": 65500}.get(fmt)
    if limit:
        w, h = min(w, limit), min(h, limit)
    img = Image.new(mode, (w, h), 0)
    if w * h <= 90_000:  # some content, cheaply
        noise = Image.effect_noise((w, h), rng.uniform(10, 100))
        img = noise.convert("I").convert("I;16") if mode == "I;16" else noise.convert(mode)
    if fmt == "JPEG" and rng.random() < 0.2:  # an EXIF orientation to apply
        exif = Image.Exif()
        exif[0x0112] = rng.randint(1, 8)
        save = {"exif": exif.tobytes()}
    else:
        save = {}
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def image_case(rng: random.Random, index: int) -> tuple[str, bytes]:
    """(kind, bytes) of case ``index``: the killers first, then hostile or odd image files."""
    if index < len(KILLERS):
        name, make = KILLERS[index]
        return name, make()
    r = rng.random()
    if r < 0.01:
        name, make = rng.choice(KILLERS)
        return name, make()
    if r < 0.35:
        return "valid", _valid_image(rng)
    if r < 0.55:
        data = _valid_image(rng)
        return "truncated", data[:rng.randint(0, max(1, len(data) - 1))]
    if r < 0.75:
        data = bytearray(_valid_image(rng))
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return "bitflip", bytes(data)
    if r < 0.85:
        sizes = [0, 1, 30_000, 100_000, 2**31 - 1, 2**32 - 1]
        return "declared", _png_declaring(rng.choice(sizes), rng.choice(sizes))
    if r < 0.95:
        heads = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00", b"MM\x00*",
                 b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM"]
        return "header+noise", rng.choice(heads) + rng.randbytes(rng.randint(0, 512))
    return "random", rng.randbytes(rng.randint(0, 2048))


def string_case(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return "".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0, 0x1f),
                                       rng.randint(0xd800, 0xdfff), rng.randint(0x80, 0x10ffff)]))
                       for _ in range(rng.randint(0, 64)))
    if r < 0.3:
        return "a red " * rng.randint(100, 20_000)
    if r < 0.4:
        return "\x00\x1b[2J\u202e\ufeff" * rng.randint(1, 50)
    if r < 0.45:
        return ""
    if r < 0.5:
        return " \t\n" * rng.randint(1, 10)
    words = ["red", "blue", "star", "circle", "wooden", "striped", "a", "the", "\u00e9t\u00e9",
             "\U0001F600", "<|endoftext|>", "'s", "\u0301"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))


class Headers(dict):
    """A header mapping whose ``get`` ignores case (as a server's is)."""

    def get(self, name, default=None):
        for k, v in self.items():
            if k.lower() == name.lower():
                return v
        return default


def http_requests(rng: random.Random, image: bytes,
                  text: str) -> list[tuple[str, str, dict, bytes]]:
    """The requests built from one case: (method, target, headers, body)."""
    boundary = f"fuzz{rng.getrandbits(32):08x}"
    textb = text.encode("utf-8", "surrogatepass")
    disposition = f"--{boundary}\r\nContent-Disposition: form-data; name="
    multipart = (f'{disposition}"sketch"; filename="s"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + image \
        + f'\r\n{disposition}"text"\r\n\r\n'.encode() + textb + f"\r\n--{boundary}--\r\n".encode()
    if rng.random() < 0.2:  # a truncated or mangled multipart body
        multipart = multipart[:rng.randint(0, len(multipart))]
    sketch_b64 = base64.b64encode(image).decode()
    if rng.random() < 0.2:
        sketch_b64 = "data:image/png;base64," + sketch_b64
    as_json = json.dumps({"sketch": sketch_b64, "text": text, "top_k": rng.choice([1, 3, 200])})
    depth = rng.choice([1, 100, 1000, 200_000])
    deep = rng.choice(["[", '{"a":']) * depth + "]" * rng.randint(0, 10)
    odd = rng.choice([{"text": 5}, {"text": ["a"]}, {"text": {"a": 1}}, {"top_k": "x"},
                      {"top_k": [1]}, {"top_k": 0}, {"top_k": True}, {"top_k": 2.5},
                      {"sketch": {}}, {"sketch": 5}, {"sketch": "!!notbase64"}, {"sketch": ""},
                      {"text": "ok", "top_k": 10**30}, {"text": "ok", "extra": 1}, [], "x", None,
                      {"text": None, "sketch": None}])
    form = b"text=" + textb[:4096]
    if rng.random() < 0.3:
        form = rng.choice([b"text=%ED%A0%80", b"text=%FF", b"top_k=-1&text=a", b"&" * 100,
                           b"text=a&text=b", b"sketch=abc", b"=" * 50])
    size = rng.choice(["16", "0", "x", "99999", "256"])
    get = rng.choice([f"/api/image/{rng.randint(0, 10**6)}?size={size}",
                      f"/api/image/{rng.randint(0, 5)}", "/api/health", "/",
                      "/static/" + text.encode("utf-8", "surrogatepass").decode("latin-1")[:100],
                      "/../../etc/passwd", "/api/query"])
    return [
        ("POST", "/api/query", {"Content-Type": f"multipart/form-data; boundary={boundary}"},
         multipart),
        ("POST", "/api/query", {"Content-Type": "application/json"},
         as_json.encode("utf-8", "surrogatepass")),
        ("POST", "/api/query", {"Content-Type": "application/json"}, deep.encode()),
        ("POST", "/api/query", {"Content-Type": "application/json"}, json.dumps(odd).encode()),
        ("POST", "/api/query", {"Content-Type": "application/x-www-form-urlencoded"}, form),
        ("GET", get, {}, b""),
    ]


# -- memory ---------------------------------------------------------------------------------------

def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMeter:
    """Peak resident memory of one call above the resident memory when it started (MB).

    On Linux, writing 5 to /proc/self/clear_refs resets the peak (VmHWM); elsewhere the meter
    falls back to ru_maxrss, which only grows, so it measures new process peaks only."""

    def __init__(self):
        self.exact = self._reset() and _proc_kb("VmHWM") is not None

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> float:
        if self.exact:
            self._reset()
            return _proc_kb("VmRSS") / 1024
        return _maxrss_mb()

    def stop(self, start: float) -> float:
        peak = _proc_kb("VmHWM") / 1024 if self.exact else _maxrss_mb()
        return max(0.0, peak - start)


# -- the run (in a child process, so a crash is counted, not fatal) -------------------------------

def new_counts() -> dict:
    return {"cases": 0, "http_requests": 0, "http_status": {}, "http_bad_json": 0, "tracebacks": 0,
            "query_ok": 0, "query_refused": 0, "enroll_rounds": 0, "enroll_added": 0,
            "enroll_skipped": 0, "enroll_failed": 0, "index_inconsistent": 0,
            "index_changed_by_query": 0, "crashes": 0, "crashed_cases": [],
            "peak_mb": {"http": 0.0, "query": 0.0, "enroll_round": 0.0},
            "peak_case": {"http": "", "query": "", "enroll_round": ""},
            "over_limit": 0, "peak_rss_above_baseline_mb": 0.0, "examples": []}


def _example(counts: dict, line: str) -> None:
    if len(counts["examples"]) < 30:
        counts["examples"].append(line[:400])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_round(before: dict, after: dict, on_disk: dict, pending: list[Path],
                skipped: set[str]) -> list[str]:
    """What is wrong with the index after an enroll round (empty: consistent).

    ``before`` / ``after`` / ``on_disk``: path -> sha256 of the index before the round, after it
    (the Searcher's) and reloaded from disk; ``skipped``: display forms of the report's skipped
    files. The index must hold the earlier entries with the same sha256, plus each new case file
    that was not skipped, with its file's sha256, and nothing else."""
    from stbir_infer.paths import display

    problems = []
    new = {os.fsdecode(p) for p in pending if display(os.fsdecode(p)) not in skipped}
    for p, sha in before.items():
        if after.get(p) != sha:
            problems.append(f"earlier entry {display(p)} {'changed' if p in after else 'lost'}")
    for p in sorted(new):
        if p not in after:
            problems.append(f"new file {display(p)} neither indexed nor skipped")
        elif after[p] != _sha256(Path(p)):
            problems.append(f"new file {display(p)} indexed with another sha256")
    extra = set(after) - set(before) - new
    if extra:
        problems.append(f"unexpected entries: {sorted(display(p) for p in extra)[:3]}")
    if on_disk != after:
        problems.append("the index reloaded from disk differs from the Searcher's")
    return problems


def run_cases(export_dir: str, n_cases: int, seed: int, workdir: str, enroll_every: int = 50,
              start: int = 0, state_file: str | None = None) -> dict:
    """Cases ``start`` .. ``n_cases - 1`` (case i is seeded by (seed, i), so a run can resume);
    the gallery and index live under ``workdir`` (reused when resuming). ``state_file``: where
    the counts so far and the case being run are written before each case (the parent reads it
    when this process dies). Returns the counts."""
    from PIL import Image

    from stbir_infer import Searcher, StbirInferError
    from stbir_infer.gallery import GalleryIndex
    from stbir_infer.paths import display
    from stbir_infer.web.app import App

    work = Path(workdir).resolve()
    gallery, index, scratch = work / "gallery", work / "index", work / "scratch"
    state = Path(state_file) if state_file else work / "state.json"
    counts = json.loads(state.read_text())["counts"] if start and state.exists() else new_counts()
    fresh = not gallery.exists()
    gallery.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    if fresh:  # a few real photos, so queries have something to rank
        for i in range(4):
            Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(gallery / f"seed_{i}.png")
    searcher = Searcher(export_dir, index, threads=1)
    if searcher.current_index() is None:  # not when resuming: case files wait for their round
        searcher.enroll(gallery)
    app = App(searcher)
    app.warm_up()
    searcher.query(sketch=str(gallery / "seed_0.png"), text="warm up", top_k=3)
    meter = PeakMeter()
    base_rss = (_proc_kb("VmRSS") / 1024) if meter.exact else _maxrss_mb()
    counts["meter"] = "clear_refs" if meter.exact else "ru_maxrss"
    crash_at = int(os.environ.get("STBIR_FUZZ_CRASH_AT", "-1"))  # tests: a simulated crash
    known = searcher.current_index()
    pending: list[Path] = sorted(p for p in gallery.iterdir() if p.name.startswith("case_")
                                 and str(p) not in known.files and str(p) not in known.skipped)

    def measured(door: str, kind: str, fn):
        m0 = meter.start()
        try:
            return fn()
        finally:
            mb = meter.stop(m0)
            above = m0 + mb - base_rss  # this request's peak above the warmed-up baseline
            if above > counts["peak_rss_above_baseline_mb"]:
                counts["peak_rss_above_baseline_mb"] = round(above, 1)
            if mb > counts["peak_mb"][door]:
                counts["peak_mb"][door], counts["peak_case"][door] = round(mb, 1), kind
            if mb >= PEAK_LIMIT_MB:
                counts["over_limit"] += 1
                _example(counts, f"{door} [{kind}]: peak {mb:.0f} MB above its start")

    def traceback_(where: str, exc: BaseException, kind: str):
        counts["tracebacks"] += 1
        _example(counts, f"{where} [{kind}]: {type(exc).__name__}: {str(exc)[:200]}")

    def save_state(i: int, kind: str):
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"case": i, "kind": kind, "counts": counts}))
        os.replace(tmp, state)

    for i in range(start, n_cases):
        rng = random.Random(f"{seed}:{i}")
        kind, data = image_case(rng, i)
        text = string_case(rng)
        save_state(i, kind)
        if i == crash_at:
            os.abort()
        counts["cases"] += 1
        generation = searcher.current_index().generation
        # 1. HTTP API
        for method, target, headers, body in http_requests(rng, data, text):
            headers = Headers({"Host": "127.0.0.1", "Content-Length": str(len(body)), **headers})
            stream = io.BytesIO(body)
            try:
                resp = measured("http", kind,
                                lambda: app.handle(method, target, headers, stream.read))
            except Exception as exc:  # noqa: BLE001 - App.handle must never raise
                traceback_(f"http {method} {target[:40]}", exc, kind)
                continue
            counts["http_requests"] += 1
            key = str(resp.status)
            counts["http_status"][key] = counts["http_status"].get(key, 0) + 1
            if resp.content_type.startswith("application/json"):
                try:  # every API answer is a JSON document in UTF-8
                    json.loads(resp.body.decode("utf-8"))
                except ValueError as exc:
                    counts["http_bad_json"] += 1
                    _example(counts, f"http {method} {target[:40]} {resp.status} [{kind}]: "
                                     f"answer is not UTF-8 JSON ({exc})")
            if resp.status >= 500:
                _example(counts, f"http {method} {target[:40]} {resp.status} [{kind}]: "
                                 f"{resp.body[:200]!r}")
        # 2. Searcher.query with the case as a sketch file, the string as a text
        path = scratch / f"case_{i:06d}.bin"
        path.write_bytes(data)
        for args in ({"sketch": str(path)}, {"sketch": str(path), "text": text}, {"text": text}):
            try:
                measured("query", kind, lambda: searcher.query(top_k=3, **args))
                counts["query_ok"] += 1
            except StbirInferError:
                counts["query_refused"] += 1
            except Exception as exc:  # noqa: BLE001
                traceback_("query", exc, kind)
        if searcher.current_index().generation != generation:
            counts["index_changed_by_query"] += 1
        # 3. enroll: the case joins the gallery; every few cases, one enroll round
        ext = rng.choice(EXTENSIONS)
        target = gallery / (f"case_{i:06d}.{ext}" if ext else f"case_{i:06d}")
        os.replace(path, target)
        pending.append(target)
        if len(pending) >= enroll_every or i == n_cases - 1:
            before = {p: r["sha256"] for p, r in searcher.current_index().files.items()}
            try:
                report = measured("enroll_round", kind, lambda: searcher.enroll(gallery))
            except StbirInferError as exc:
                counts["enroll_failed"] += 1
                _example(counts, f"enroll refused: {type(exc).__name__}: {str(exc)[:200]}")
                pending.clear()
                continue
            except Exception as exc:  # noqa: BLE001
                traceback_("enroll", exc, kind)
                pending.clear()
                continue
            after = {p: r["sha256"] for p, r in searcher.current_index().files.items()}
            on_disk = {p: r["sha256"] for p, r in GalleryIndex.load(index).files.items()}
            skipped = {display(p) for p, _ in report.skipped_files}
            problems = check_round(before, after, on_disk, pending, skipped)
            if problems:
                counts["index_inconsistent"] += 1
                _example(counts, f"enroll round {counts['enroll_rounds']}: "
                                 + "; ".join(problems[:3]))
            counts["enroll_rounds"] += 1
            n_skipped = sum(display(os.fsdecode(p)) in skipped for p in pending)
            counts["enroll_skipped"] += n_skipped
            counts["enroll_added"] += len(pending) - n_skipped
            pending.clear()
    counts["http_500s"] = sum(v for k, v in counts["http_status"].items() if int(k) >= 500)
    counts["baseline_rss_mb"] = round(base_rss, 1)
    counts["rss_growth_mb"] = round(((_proc_kb("VmRSS") or 0) / 1024) - base_rss, 1)
    save_state(n_cases, "done")
    return counts


_CHILD = ("import json, sys; sys.path.insert(0, {bench!r}); import fuzz; "
          "print('RESULT ' + json.dumps(fuzz.run_cases({export!r}, {n}, {seed}, {work!r}, "
          "{every}, start={start}, state_file={state!r})))")


def run_in_child(export_dir: str | Path, n_cases: int, seed: int, *, enroll_every: int = 50,
                 timeout: float = 4 * 3600, max_crashes: int = 20, env: dict | None = None) -> dict:
    """``run_cases`` in a child process. When the child dies (a signal, the OOM killer, a hang
    past ``timeout``), the parent counts a crash at the case it was running and starts a new child
    at the next case, on the same gallery and index (up to ``max_crashes``)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stbir-fuzz-") as work:
        state = Path(work) / "state.json"
        start, crashes, stderr = 0, [], ""
        while True:
            code = _CHILD.format(bench=str(Path(__file__).resolve().parent), export=str(export_dir),
                                 n=n_cases, seed=seed, work=work, every=enroll_every, start=start,
                                 state=str(state))
            left = max(1.0, timeout - (time.time() - t0))
            try:
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      timeout=left, env={**os.environ, **(env or {})})
                rc, out, stderr = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, out = "timeout", ""
                stderr = exc.stderr or ""
                if isinstance(stderr, bytes):
                    stderr = stderr.decode("utf-8", "replace")
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if rc == 0 and lines:
                result = json.loads(lines[-1][len("RESULT "):])
                break
            # The child died: count it at the case it was running, resume after it.
            st = json.loads(state.read_text()) if state.exists() else None
            case = st["case"] if st else -1
            crashes.append({"case": case, "kind": st["kind"] if st else "?",
                            "returncode": rc, "stderr": stderr[-1500:]})
            if st is None or case >= n_cases or len(crashes) > max_crashes or rc == "timeout":
                result = st["counts"] if st else new_counts()
                result["aborted"] = True
                break
            st["counts"]["cases"] += 1  # the case that crashed
            state.write_text(json.dumps(st))
            start = case + 1
            if start >= n_cases:
                result = st["counts"]
                break
    result["crashes"] = len(crashes)
    result["crashed_cases"] = crashes
    result["crashed"] = bool(crashes)
    result["http_500s"] = sum(v for k, v in result["http_status"].items() if int(k) >= 500)
    return result


def _graph_gallery(tmp: Path) -> tuple[Path, Path]:
    """Three photos and a sketch for the graph cases."""
    from PIL import Image

    photos = tmp / "graph-photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 64), colour).save(photos / f"{i}.png")
    Image.new("L", (64, 64), 255).save(tmp / "graph-sketch.png")
    return photos, tmp / "graph-sketch.png"


def _files_clean(result: dict) -> bool:
    return all(not r.get("aborted") and r["signals"] == 0 and r["tracebacks"] == 0
               and r["wrong_answers"] == 0
               for r in (result.get("files"), result.get("graphs")) if r is not None)


def passed(result: dict) -> bool:
    peak = max(result["peak_mb"].values())
    return (_files_clean(result) and not result["crashed"] and not result.get("aborted") and result["tracebacks"] == 0
            and result["http_500s"] == 0 and result["http_bad_json"] == 0
            and result["index_inconsistent"] == 0
            and result["enroll_failed"] == 0 and result["index_changed_by_query"] == 0
            and result["over_limit"] == 0 and peak < PEAK_LIMIT_MB
            and result.get("peak_rss_above_baseline_mb", 0) < PEAK_LIMIT_MB)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enroll-every", type=int, default=50, help="cases per enroll round")
    p.add_argument("--model", type=Path, default=None,
                   help="export dir (default: a random small one)")
    p.add_argument("--files", type=int, default=0,
                   help="crafted index cases (benchmarks/fuzz_files.py), and the graph cases")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    import fuzz_files

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stbir-fuzz-export-") as tmp:
        export = args.model or common.random_export("small", Path(tmp), quantize=False)[0]
        result = run_in_child(export, args.cases, args.seed, enroll_every=args.enroll_every)
        if args.files:
            result["files"] = fuzz_files.run_in_child(args.files, args.seed)
            photos, sketch = _graph_gallery(Path(tmp))
            result["graphs"] = fuzz_files.graph_cases(export, photos, sketch)
    result["seconds"] = round(time.time() - t0, 1)
    result["seed"] = args.seed
    given = argv if argv is not None else sys.argv[1:]
    result["command"] = " ".join(["python benchmarks/fuzz.py", *given])
    result["passed"] = passed(result)
    common.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("examples", "crashed_cases")},
                     indent=2))
    for line in result.get("examples", []):
        print("  " + line)
    for c in result.get("crashed_cases", []):
        print(f"  crash at case {c['case']} [{c['kind']}]: returncode {c['returncode']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

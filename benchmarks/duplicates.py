"""``stbir-infer duplicates``: precision / recall of its groups on real photos, and its runtime at
100k vectors.

Real photos: the first ``--photos`` Flickr8k validation photos (split.csv, in file-name order),
each with five edited copies (one of each kind: re-encoded JPEG at quality 60-95, resized to
50-100%, cropped by 2-10% of each side's length, brightness x0.85-1.15 (at least 5% off),
stored rotated with an EXIF orientation tag that turns it back), all enrolled with the real-photo
export into one index. Then, at each threshold, ``duplicates.find``'s groups are scored:

- precision: of the member pairs inside groups, the share whose two photos come from the same
  original (a copy with its original or two copies of one original; any other pair is a false
  positive);
- recall: the share of copies that sit in the same group as their original;
- same-scene pairs: pairs of *different* originals of the same scene kind (subject + setting
  words from their captions, e.g. dog + grass) that score at or above the threshold (exact, over
  all such pairs): the "two different dogs on grass" that must not be grouped.

The default threshold is the one with the highest recall among those with precision >= 0.98
(the higher threshold on a tie). ``--scale N``: N synthetic unit vectors (dim of the export) with
1% planted near-copies (cosine about 0.97), the HNSW build and the duplicate pass timed apart.

    nice .venv/bin/python benchmarks/duplicates.py --photos 300
"""

from __future__ import annotations

import argparse
import csv
import itertools
import shutil
import sys
import time
from pathlib import Path

import common
import numpy as np
from PIL import Image, ImageEnhance

from stbir_infer.duplicates import DEFAULT_THRESHOLD, components, find, similar_pairs
from stbir_infer.gallery import GalleryIndex, HnswParams
from stbir_infer.searcher import Searcher

DATA = common.REPO.parent / "shared" / "data" / "flickr8k"
EXPORT = common.REPO / "runs" / "real8k" / "export"
THRESHOLDS = (0.70, 0.75, 0.80, 0.83, 0.85, 0.88, 0.90, 0.92, 0.95, 0.98)
EDITS = ("jpeg", "resize", "crop", "brightness", "exif")
SUBJECTS = {"dog": ("dog", "puppy"), "child": ("child", "boy", "girl", "kid", "baby"),
            "man": ("man", "men", "guy"), "woman": ("woman", "women", "lady"),
            "people": ("people", "group", "crowd"), "bike": ("bike", "bicycle", "biker"),
            "horse": ("horse",)}
SETTINGS = {"snow": ("snow",), "water": ("water", "pool", "lake", "river", "ocean", "wave"),
            "beach": ("beach", "sand"), "grass": ("grass", "field", "lawn"),
            "street": ("street", "road", "sidewalk", "city")}


def scene_kind(captions: list[str]) -> str:
    """subject+setting from the captions' words (the most-mentioned of each; "other" if none)."""
    words = " ".join(captions).lower().replace(".", " ").replace(",", " ").split()

    def pick(table):
        counts = {k: sum(words.count(w) for w in ws) for k, ws in table.items()}
        best = max(counts, key=counts.get)
        return best if counts[best] else "other"

    return f"{pick(SUBJECTS)}+{pick(SETTINGS)}"


def edit(img: Image.Image, kind: str, rng: np.random.Generator, out: Path) -> dict:
    """One edited copy of ``img`` written to ``out`` (a .jpg); returns its parameters."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "jpeg":
        q = int(rng.integers(60, 96))
        img.save(out, quality=q)
        return {"quality": q}
    if kind == "resize":
        s = float(rng.uniform(0.5, 1.0))
        img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC).save(out, quality=90)
        return {"scale": round(s, 3)}
    if kind == "crop":
        f = float(rng.uniform(0.02, 0.10))
        cw, ch = round(w * (1 - f)), round(h * (1 - f))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((x, y, x + cw, y + ch)).save(out, quality=90)
        return {"cropped": round(f, 3)}
    if kind == "brightness":
        f = float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.15))
        ImageEnhance.Brightness(img).enhance(1 + f).save(out, quality=90)
        return {"brightness": round(f, 3)}
    # stored turned a quarter (counter-clockwise); orientation 6 tells a viewer to turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(out, quality=90, exif=exif.tobytes())
    return {"orientation": 6}


def build(photos: int, work: Path, seed: int) -> tuple[dict, dict]:
    """Originals + copies under work/photos; returns ({path: (original, kind)}, {original: scene})."""
    with open(DATA / "split.csv", newline="") as f:
        split = {r["image"]: r["split"] for r in csv.DictReader(f)}
    captions: dict[str, list[str]] = {}
    with open(DATA / "captions.csv", newline="") as f:
        for r in csv.DictReader(f):
            captions.setdefault(r["image"], []).append(r["caption"])
    names = sorted(n for n, s in split.items() if s == "val")[:photos]
    rng = np.random.default_rng(seed)
    src = {}
    folder = work / "photos"
    folder.mkdir(parents=True)
    for name in names:
        stem = Path(name).stem
        shutil.copy(DATA / "images" / name, folder / name)
        src[str(folder / name)] = (stem, "original")
        with Image.open(DATA / "images" / name) as img:
            for kind in EDITS:
                out = folder / f"{stem}_{kind}.jpg"
                edit(img, kind, rng, out)
                src[str(out)] = (stem, kind)
    return src, {Path(n).stem: scene_kind(captions[n]) for n in names}


def score(report, src: dict) -> dict:
    tp = fp = 0
    group_of = {}
    for g, group in enumerate(report.groups):
        origins = [src[m.path][0] for m in group.members]
        for a, b in itertools.combinations(origins, 2):
            tp, fp = tp + (a == b), fp + (a != b)
        for m in group.members:
            group_of[m.path] = g
    originals = {o: p for p, (o, k) in src.items() if k == "original"}
    found = {k: [0, 0] for k in EDITS}
    for path, (origin, kind) in src.items():
        if kind != "original":
            g = group_of.get(path)
            found[kind][0] += g is not None and g == group_of.get(originals[origin])
            found[kind][1] += 1
    hits, total = sum(f[0] for f in found.values()), sum(f[1] for f in found.values())
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": hits / total,
            "true_pairs": tp, "false_pairs": fp, "groups": len(report.groups),
            "recall_by_edit": {k: f[0] / f[1] for k, f in found.items()}}


def scene_pairs(idx: GalleryIndex, src: dict, scenes: dict) -> tuple[list, list]:
    """(cosines of different-original pairs of the same scene kind, of any kind)."""
    orig = [(p, o) for p, (o, k) in src.items() if k == "original"]
    labels = [int(idx.files[p]["label"]) for p, _ in orig]
    v = np.asarray(idx.hnsw.get_items(labels), np.float32)
    sims = v @ v.T
    same, every = [], []
    for i, j in itertools.combinations(range(len(orig)), 2):
        every.append(float(sims[i, j]))
        if scenes[orig[i][1]] == scenes[orig[j][1]] and not scenes[orig[i][1]].startswith("other"):
            same.append(float(sims[i, j]))
    return same, every


def real_photos(args, result: dict) -> list[str]:
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    src, scenes = build(args.photos, work, args.seed)
    s = Searcher(args.model, work / "index", threads=args.threads)
    s.enroll(work / "photos", batch_size=32)
    result["enroll_seconds"] = round(time.perf_counter() - t0, 1)
    idx = s.current_index()
    same, every = scene_pairs(idx, src, scenes)
    rows = []
    for t in THRESHOLDS:
        r = score(find(work / "index", t, threads=args.threads), src)
        r.update(threshold=t, same_scene_pairs_above=sum(x >= t for x in same),
                 different_pairs_above=sum(x >= t for x in every))
        rows.append(r)
    ok = [r for r in rows if r["precision"] >= 0.98]
    best = max(ok, key=lambda r: (r["recall"], r["threshold"])) if ok else None
    result.update(photos=args.photos, copies=len(src) - args.photos, images=len(idx),
                  scene_kinds=dict(sorted(_count(scenes.values()).items())),
                  same_scene_pairs=len(same), different_pairs=len(every),
                  same_scene_max_cosine=max(same) if same else None, rows=rows,
                  chosen=None if best is None else best["threshold"],
                  runtime_default=DEFAULT_THRESHOLD)
    md = ["| threshold | precision | recall | jpeg | resize | crop | brightness | exif | "
          "same-scene pairs above | different pairs above |", "|" + "---|" * 10]
    for r in rows:
        e = r["recall_by_edit"]
        md.append(f"| {r['threshold']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                  + " | ".join(f"{e[k]:.2f}" for k in EDITS)
                  + f" | {r['same_scene_pairs_above']} of {len(same)} | "
                    f"{r['different_pairs_above']} of {len(every)} |")
    md.append(f"\nchosen: {result['chosen']} (highest recall with precision >= 0.98)")
    if not args.keep:
        shutil.rmtree(work)
    return md


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def scale(args, result: dict) -> list[str]:
    """N random unit vectors, 1% with a planted near-copy; build and duplicate pass timed."""
    rng = np.random.default_rng(args.seed)
    n, dim = args.scale, args.dim
    base = rng.standard_normal((n, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    planted = n // 100
    noise = rng.standard_normal((planted, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = base[:planted] + 0.25 * noise  # cosine to its original about 0.97
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    vectors = np.concatenate([base[: n - planted], copies])
    idx = GalleryIndex.create(dim=dim, model={}, params=HnswParams())
    idx.hnsw.set_num_threads(args.threads)
    t0 = time.perf_counter()
    idx.add_vectors(vectors, [f"{i:064x}" for i in range(n)])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = similar_pairs(idx, args.scale_threshold)
    groups = components(pairs)
    pass_s = time.perf_counter() - t0
    want = {(i, n - planted + i) for i in range(planted)}
    got = {(a, b) for a, b, _ in pairs}
    result["scale"] = {"vectors": n, "dim": dim, "planted_pairs": planted,
                       "threshold": args.scale_threshold, "build_seconds": round(build_s, 1),
                       "duplicates_seconds": round(pass_s, 2), "groups": len(groups),
                       "planted_found": len(want & got) / planted,
                       "other_pairs": len(got - want), "threads": args.threads}
    sc = result["scale"]
    return [f"\n{n:,} vectors of {dim} dims ({planted:,} planted copies, threshold "
            f"{args.scale_threshold}): HNSW build {sc['build_seconds']} s, duplicate pass "
            f"{sc['duplicates_seconds']} s ({args.threads} threads), planted pairs found "
            f"{sc['planted_found']:.3f}, other pairs {sc['other_pairs']}"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1000,
                    help="Flickr8k validation originals (0: skip)")
    ap.add_argument("--model", type=Path, default=EXPORT)
    ap.add_argument("--work", type=Path, default=common.REPO / "runs" / "duplicates-bench")
    ap.add_argument("--keep", action="store_true", help="keep the photos and the index")
    ap.add_argument("--scale", type=int, default=100_000, help="synthetic vectors (0: skip)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--scale-threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=common.RESULTS / "duplicates.json")
    args = ap.parse_args(argv)
    if args.photos and not DATA.is_dir():
        sys.exit(f"{DATA} is missing (the shared Flickr8k data); run with --photos 0")
    result, t_start = common.begin("duplicates", args.threads)
    md = ["# stbir-infer duplicates", ""]
    if args.photos:
        md += real_photos(args, result)
    if args.scale:
        md += scale(args, result)
    common.finish("duplicates", result, args.out, "\n".join(md), t_start)
    return result


if __name__ == "__main__":
    main()

"""`--min-score auto` on the built-in test set: does a query whose photo is absent say "no match",
and does a present one still find its photo first?

    python benchmarks/no_match.py --model EXPORT --data DATA_DIR [--absent curve] [--out out.json]

DATA_DIR is a `stbir-train synth` folder (CATEGORY/testA sketches, testB photos, test.txt).
Three galleries, each queried by every test sketch + caption (and sketch-only, text-only):
- present: all test photos; a query succeeds when its photo is first and kept;
- photo absent: the same, with the query's own photo taken out of the hits (as if not enrolled):
  it succeeds when nothing is left above the threshold;
- category absent: an index without the ``--absent`` category; its queries should find nothing.
Runtime only (stbir_infer); the thresholds are the export's (validation, FAR 1e-3 by default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from stbir_infer.searcher import Searcher


def test_items(data: Path) -> list[dict]:
    out = []
    for cat_dir in sorted(p for p in data.iterdir() if (p / "test.txt").is_file()):
        for line in (cat_dir / "test.txt").read_text().splitlines():
            photo, text = line.split("\t", 1)
            out.append({"category": cat_dir.name, "photo": str((cat_dir / "testB" / photo).resolve()),
                        "sketch": str(cat_dir / "testA" / f"{Path(photo).stem}_0.png"), "text": text})
    return out


def run(model: str, data: Path, absent: str, top_k: int = 10) -> dict:
    items = test_items(data)
    tmp = Path(tempfile.mkdtemp(prefix="no-match-"))
    try:
        full, part = tmp / "full", tmp / "part"
        for it in items:
            for root in (full, part) if it["category"] != absent else (full,):
                dst = root / it["category"] / Path(it["photo"]).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(it["photo"], dst)
        s_full, s_part = Searcher(model, tmp / "idx-full"), Searcher(model, tmp / "idx-part")
        s_full.enroll(full)
        s_part.enroll(part)
        res = {"thresholds": s_full.fusion.describe().get("score_threshold"),
               "fusion": s_full.fusion.method, "modes": {}}
        for mode in ("sketch+text", "sketch", "text"):
            c = dict(present=0, present_first=0, photo_absent_no_match=0, cat_absent=0,
                     cat_absent_no_match=0, n=0)
            for it in items:
                q = {"sketch": it["sketch"] if mode != "text" else None,
                     "text": it["text"] if mode != "sketch" else None}
                thr = s_full.min_score_for("auto", **q)
                if it["category"] == absent:
                    c["cat_absent"] += 1
                    c["cat_absent_no_match"] += not s_part.query(**q, top_k=1, min_score=thr)
                hits = s_full.query(**q, top_k=top_k)
                c["n"] += 1
                first = hits[0]
                c["present_first"] += first.score >= thr and Path(first.path).name == Path(it["photo"]).name
                others = [h for h in hits if Path(h.path).name != Path(it["photo"]).name]
                c["photo_absent_no_match"] += not others or others[0].score < thr
            res["modes"][mode] = {
                "queries": c["n"], "threshold": thr,
                "present: true photo first and kept": c["present_first"] / c["n"],
                "photo absent: no match": c["photo_absent_no_match"] / c["n"],
                f"category {absent} absent: no match": c["cat_absent_no_match"] / max(c["cat_absent"], 1)}
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--absent", default="curve")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = run(args.model, args.data, args.absent)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

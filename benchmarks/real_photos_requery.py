"""Query a finished real-photo run with another run's test sketches (same held-out photos).

    python benchmarks/real_photos_requery.py runs/real8k-v2 --queries runs/real8k/data \
        [--out benchmarks/results/real_photos_flickr8k_v2_canny_queries.json]

``benchmarks/real_photos.py`` queries each run with its own recipe's test pseudo-sketches, so two
runs trained on different recipes answer different sketch queries. This ranks RUN's fp32 export
and index with the test sketches (``photos/testA``) and captions of the ``--queries`` data folder
instead (the same Flickr8k ``val`` photos): sketch, text, sketch+text and image->text R@k on
identical queries for both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_photos import query_all, table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a real_photos.py --out folder (export/, index-fp32/)")
    ap.add_argument("--queries", type=Path, required=True, help="the data folder whose photos/testA "
                    "sketches and photos/test_captions.csv are the queries")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    ours = sorted(p.name for p in (args.run / "data" / "photos" / "testB").iterdir())
    theirs = sorted(p.name for p in (args.queries / "photos" / "testB").iterdir())
    if ours != theirs:
        raise SystemExit(f"{args.run} and {args.queries} hold different test photos")
    result = query_all(args.run / "export", args.run / "index-fp32", args.queries)
    result["queries_from"] = str(args.queries)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the real-photo model's towers should learn: one `stbir-train pretrain` per row, each
scored on the held-out gallery (text->image and image->text R@k).

    python benchmarks/text_tower.py runs/real8k/data --out runs/text_tower [--rows default,...]

DATA_DIR is what `stbir-train sketchify --text-model` wrote (benchmarks/real_photos.py leaves it
at OUT/data): its config.yaml is the recipe, and each row overrides a few ``model.*`` /
``pretrain.*`` keys (ROWS below). Every row trains on the same training photos and captions and
is scored on the same test photos (Flickr8k's 1,000 validation photos, 5,000 captions) with the
torch model, so rows differ only in what they change; the wall time of each is its own command's
(caching the locked layers included). Writes OUT/text_tower.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from benchmarks import common  # noqa: E402

# name -> (what it measures, overrides). Epoch counts put the text-tower rows at about equal
# wall time on two cores: the locked tower is computed once, a tuned one runs every step.
ROWS = {
    "default": ("text locked, image top 6 groups at 0.1x lr, MLP heads, 160 px", {}),
    "text-top2": ("text top 2 of 6 layers tuned at 0.1x lr", {
        "model.text_unlocked_layers": 2, "pretrain.epochs": 3}),
    "text-all": ("text tower all tuned at 0.1x lr", {
        "model.text_unlocked_layers": -1, "pretrain.epochs": 2}),
    "image-locked": ("image trunk locked too (only heads learn)", {
        "model.image_unlocked_layers": 0}),
    "linear-heads": ("linear projection heads instead of MLP", {
        "model.text_proj": "linear", "model.image_proj": "linear"}),
    "96px": ("image tower at 96 px", {"model.image_size": 96}),
    "128px": ("image tower at 128 px", {"model.image_size": 128}),
    "224px": ("image tower at 224 px", {"model.image_size": 224}),
}


def write_config(data: Path, out: Path, overrides: dict) -> Path:
    cfg = yaml.safe_load((data / "config.yaml").read_text())
    # Every row starts where sketchify's config starts: ImageNet weights in the image tower (the
    # file both visual towers name), not a clip.pt that a finished run may have set.
    cfg["model"]["pretrained"] = cfg["model"]["sketch_pretrained"]
    cfg["output_dir"] = str(out)
    cfg["data"]["root"] = str(data)
    for k in ("captions", "images"):
        cfg["pretrain"][k] = str(data / cfg["pretrain"][k])
    common.set_dotted(cfg, overrides)
    path = out / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def score(config: Path, data: Path) -> dict:
    """R@k of the pretrained towers on the test photos (torch, the checkpoint's clip.pt)."""
    import torch

    from models import build_model
    from stbir_infer.preprocess import open_image, preprocess
    from stbir_train.config import load_config
    from stbir_train.pretrain import KS

    cfg = load_config(config)
    spec = cfg.model.spec()
    spec.pretrained = str(cfg.out / cfg.pretrain.output / "clip.pt")
    model = build_model(spec).eval()
    cat = data / "photos"
    photos = sorted((cat / "testB").iterdir())
    with (cat / "test_captions.csv").open(newline="", encoding="utf-8") as f:
        captions = [(row[0], row[1]) for row in list(csv.reader(f))[1:]]
    index = {p.name: i for i, p in enumerate(photos)}
    owner = np.array([index[name] for name, _ in captions])
    image_spec = model.input_specs()["image"]
    with torch.no_grad():
        img = torch.cat([model.encode_image(torch.from_numpy(np.stack(
            [preprocess(open_image(p, 3), image_spec) for p in photos[i:i + 128]])))
            for i in range(0, len(photos), 128)])
        tok = model.tokenizer()([c for _, c in captions])
        txt = torch.cat([model.encode_text(tok[i:i + 256]) for i in range(0, len(tok), 256)])
    sim = (txt @ img.T).numpy()
    t_rank = (sim > sim[np.arange(len(owner)), owner][:, None]).sum(1)
    best = np.array([sim[owner == p, p].max() for p in range(len(photos))])
    i_rank = (best[:, None] < sim.T).sum(1)
    return {"text->image": {f"R@{k}": float((t_rank < k).mean()) for k in KS},
            "image->text": {f"R@{k}": float((i_rank < k).mean()) for k in KS},
            "median_rank_text": float(np.median(t_rank + 1)),
            "photos": len(photos), "captions": len(captions)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="sketchify --text-model output (config.yaml)")
    ap.add_argument("--out", type=Path, default=Path("runs/text_tower"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)}")
    results_path = args.out / "text_tower.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in rows:
        what, overrides = ROWS[name]
        config = write_config(args.data_dir.resolve(), (args.out / name).resolve(), overrides)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        proc = subprocess.run([BIN / "stbir-train", "pretrain", "--config", config],
                              capture_output=True, text=True)
        seconds = time.time() - t0
        if proc.returncode:
            print(proc.stderr[-2000:])
            raise SystemExit(f"row {name} failed")
        results[name] = {"what": what, "overrides": overrides, "seconds": round(seconds, 1),
                         "load_start": load0, **score(config, args.data_dir.resolve())}
        r = results[name]
        print(f"{name}: {seconds:.0f}s, t->i R@1 {r['text->image']['R@1']:.3f} R@10 "
              f"{r['text->image']['R@10']:.3f}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print("| row | what | pretrain wall time | text->image R@1 / R@5 / R@10 | image->text R@1 / R@10 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        t, i = r["text->image"], r["image->text"]
        print(f"| {name} | {r['what']} | {r['seconds']:.0f} s | {t['R@1']:.3f} / {t['R@5']:.3f} / "
              f"{t['R@10']:.3f} | {i['R@1']:.3f} / {i['R@10']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

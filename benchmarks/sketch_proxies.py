"""Which pseudo-sketch extraction, and crop or pad per branch? Measured without training.

    python benchmarks/sketch_proxies.py ../shared/data/flickr8k-1k [--limit 1000] [--size 96]

Every photo gets one jittered pseudo-sketch per extraction method (``stbir_train.sketchify``,
exactly as ``sketchify`` makes a test sketch). Photos and sketches go through the ImageNet
MobileNetV2 trunk (``--weights``; the start of the ``edge`` preset's image and sketch towers: a
gray sketch through the RGB stem is what the one-channel sketch stem computes), pooled features,
cosine ranking of the whole collection for every sketch: R@1, R@10 and mAP (one positive each,
so mAP is the mean reciprocal rank). That is sketch-only retrieval at the towers' starting point,
for every (method, sketch resize, photo resize): what survives of a photo in its sketch, and what
a centre crop costs, before any training can compensate. Writes JSON + a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbir_infer.preprocess import open_image, preprocess  # noqa: E402
from stbir_train.captions import read_csv_pairs  # noqa: E402
from stbir_train.sketchify import METHODS, sketches_of  # noqa: E402

MODES = ("shortest", "pad")


def spec(size: int, channels: int, mode: str) -> dict:
    s = dict(size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels,
             interpolation="bicubic", resize_mode=mode)
    if mode == "pad":
        s["pad_fill"] = [255] if channels == 1 else [128, 128, 128]
    return s


@torch.no_grad()
def embed(net, images, sp: dict, batch: int = 100) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([preprocess(im, sp) for im in images[i:i + batch]]))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(torch.nn.functional.normalize(net(x), dim=-1))
    return torch.cat(out)


def rank_metrics(q: torch.Tensor, g: torch.Tensor) -> dict:
    sims = q @ g.T
    rank = (sims > sims.diag()[:, None]).sum(1).numpy() + 1  # query i's photo is gallery i
    return {"R@1": float((rank <= 1).mean()), "R@10": float((rank <= 10).mean()),
            "mAP": float((1.0 / rank).mean()), "median_rank": float(np.median(rank))}


def probe(weights: Path, photos, test_idx, method: str, smode: str, pmode: str, size: int,
          epochs: int, seed: int) -> dict:
    """Train a sketch tower (ImageNet MobileNetV2 + projection) and a projection of the frozen
    photo features with InfoNCE on the training photos (fresh jittered sketches every epoch),
    then rank the held-out photos for their test sketches."""
    import torchvision

    torch.manual_seed(seed)
    trunk = _trunk(weights)
    pfeat = embed(trunk, photos, spec(size, 3, pmode))  # frozen photo features
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.classifier = torch.nn.Linear(1280, 128)
    head = torch.nn.Linear(1280, 128)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=3e-4, weight_decay=0.05)
    train_idx = np.setdiff1d(np.arange(len(photos)), test_idx)
    sp = spec(size, 1, smode)
    for epoch in range(epochs):
        net.train()
        rng = np.random.default_rng([seed, 2, epoch])
        for b in np.array_split(rng.permutation(train_idx), max(1, len(train_idx) // 64)):
            sk = [sketches_of(photos[i], method, 1, np.random.default_rng([seed, 3, epoch, i]))[0]
                  for i in b]
            x = torch.from_numpy(np.stack([preprocess(im, sp) for im in sk])).expand(-1, 3, -1, -1)
            q = torch.nn.functional.normalize(net(x), dim=-1)
            g = torch.nn.functional.normalize(head(pfeat[b]), dim=-1)
            logits = q @ g.T / 0.07
            target = torch.arange(len(b))
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    sk = [sketches_of(photos[i], method, 1, np.random.default_rng([seed, 1, int(i)]))[0]
          for i in test_idx]
    with torch.no_grad():
        g = torch.nn.functional.normalize(head(pfeat[test_idx]), dim=-1)
    return rank_metrics(embed(net, sk, sp), g)


def _trunk(weights: Path):
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.classifier = torch.nn.Identity()
    return net.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="flickr8k-1k folder (images/, captions.txt)")
    ap.add_argument("--weights", type=Path, help="torchvision mobilenet_v2 state dict "
                    "(default: DATA_DIR/../weights/mobilenet_v2_imagenet.pt)")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-epochs", type=int, default=0,
                    help="> 0: the trained probe instead (see probe()), on a held-out split")
    ap.add_argument("--test", type=int, default=200, help="held-out photos of the trained probe")
    ap.add_argument("--runs", default="canny:shortest:shortest,xdog:shortest:shortest,"
                    "canny:pad:shortest,canny:shortest:pad,canny:pad:pad",
                    help="method:sketch_resize:photo_resize runs of the trained probe")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sketch_proxies.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    weights = args.weights or args.data_dir.parent / "weights" / "mobilenet_v2_imagenet.pt"
    pairs = read_csv_pairs(args.data_dir / "captions.txt", args.data_dir / "images")
    paths = sorted(pairs.photos, key=lambda p: p.name)[: args.limit]
    t0 = time.time()
    photos = [open_image(p, 3) for p in paths]
    if args.train_epochs > 0:
        return trained(args, weights, photos, t0)
    net = _trunk(weights)
    sketches = {m: [] for m in METHODS}
    for i, im in enumerate(photos):
        for m in METHODS:  # the same generator state per method: same jitter draws
            sketches[m].append(sketches_of(im, m, 1, np.random.default_rng([args.seed, 1, i]))[0])
    t_sketch = time.time() - t0
    gallery = {mode: embed(net, photos, spec(args.size, 3, mode)) for mode in MODES}
    rows = []
    for m in METHODS:
        for smode in MODES:
            q = embed(net, sketches[m], spec(args.size, 1, smode))
            for pmode in MODES:
                rows.append({"method": m, "sketch_resize": smode, "photo_resize": pmode,
                             **rank_metrics(q, gallery[pmode])})
    result = {"photos": len(photos), "size": args.size, "weights": str(weights),
              "sketch_seconds": round(t_sketch, 1), "total_seconds": round(time.time() - t0, 1),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(photos)} photos, {args.size} px, chance R@1 {1 / len(photos):.4f}; "
          f"sketches {t_sketch:.0f}s, total {result['total_seconds']:.0f}s")
    print("| method | sketch resize | photo resize | R@1 | R@10 | mAP | median rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['sketch_resize']} | {r['photo_resize']} | {r['R@1']:.3f} | "
              f"{r['R@10']:.3f} | {r['mAP']:.3f} | {r['median_rank']:.0f} |")
    return 0


def trained(args, weights: Path, photos, t0: float) -> int:
    test_idx = np.sort(np.random.default_rng([args.seed, 15]).permutation(len(photos))[: args.test])
    rows = []
    print(f"trained probe: {len(photos) - args.test} training / {args.test} held-out photos, "
          f"{args.train_epochs} epochs, {args.size} px; chance R@1 {1 / args.test:.3f}")
    print("| method | sketch resize | photo resize | R@1 | R@10 | mAP | median rank | s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        method, smode, pmode = run.split(":")
        t = time.time()
        r = {"method": method, "sketch_resize": smode, "photo_resize": pmode,
             **probe(weights, photos, test_idx, method, smode, pmode, args.size,
                     args.train_epochs, args.seed), "seconds": round(time.time() - t, 1)}
        rows.append(r)
        print(f"| {method} | {smode} | {pmode} | {r['R@1']:.3f} | {r['R@10']:.3f} | "
              f"{r['mAP']:.3f} | {r['median_rank']:.0f} | {r['seconds']:.0f} |", flush=True)
    result = {"photos": len(photos), "test": args.test, "epochs": args.train_epochs,
              "size": args.size, "total_seconds": round(time.time() - t0, 1), "rows": rows}
    out = args.out.with_name(args.out.stem + "_trained.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

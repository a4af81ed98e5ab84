"""stbir_infer.enroll_pipeline: worker threads decode ahead of the encoder, in order, with bounded
look-ahead; the same pixels as a plain decode; bad and changed files reported, not fatal; the
stages timed in `stbir-infer enroll --json`."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
from infer_helpers import make_photos, run_cli

from stbir_infer import enroll_pipeline as pipe
from stbir_infer import preprocess as P
from stbir_infer.edges import gallery_sketch
from stbir_infer.errors import ImageDecodeError

SPEC = {"size": 32, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
        "interpolation": "bicubic", "resize_mode": "shortest"}
SKETCH_SPEC = {"size": 24, "channels": 1, "mean": [0.5], "std": [0.5], "interpolation": "bicubic",
               "resize_mode": "pad", "pad_fill": [255]}


def _groups(folder, names):
    out = []
    for name in names:
        path = folder / name
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append((sha, [SimpleNamespace(path=str(path))]))
    return out


def test_batches_come_back_in_order_with_the_pixels_of_a_plain_decode(tmp_path):
    names = [f"p{i}.png" for i in range(7)]
    make_photos(tmp_path, names)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "moved.png").write_bytes((tmp_path / "p0.png").read_bytes())
    groups = _groups(tmp_path, names + ["bad.jpg", "moved.png"])
    (tmp_path / "moved.png").write_bytes(b"rewritten after hashing")  # sha256 no longer matches
    batches = [groups[i:i + 3] for i in range(0, len(groups), 3)]
    stages = pipe.Stages()
    got = list(pipe.decoded_batches(batches, SPEC, stages, workers=2, ahead=1,
                                    sketch_spec=SKETCH_SPEC))
    assert [b for b, _ in got] == batches
    outcomes = [o for _, out in got for o in out]
    assert len(outcomes) == len(groups)
    for name, (result, changed, sketch) in zip(names, outcomes):
        assert changed == [] and np.array_equal(result, P.load(tmp_path / name, SPEC))
        # the edge gallery's pixels: the photo's pseudo-sketch as a drawn query would be
        photo = P.open_image(tmp_path / name, 3, target=SPEC["size"])
        assert np.array_equal(sketch, P.load(gallery_sketch(photo), SKETCH_SPEC))
    plain = list(pipe.decoded_batches(batches[:1], SPEC, pipe.Stages(), workers=1))
    assert all(sketch is None for _, out in plain for _, _, sketch in out)
    bad, moved = outcomes[-2], outcomes[-1]
    assert isinstance(bad[0], ImageDecodeError) and bad[1] == []
    assert moved[0] is None and [c.path for c in moved[1]] == [str(tmp_path / "moved.png")]
    assert stages.decode > 0 and stages.preprocess > 0 and stages.wait >= 0


def test_at_most_ahead_batches_are_decoded_before_they_are_taken(tmp_path):
    make_photos(tmp_path, ["a.png"])
    one = _groups(tmp_path, ["a.png"])
    pulled = []

    def batches():  # counts how far the pipeline has read
        for i in range(10):
            pulled.append(i)
            yield one

    seen = []
    for _n, (_batch, out) in enumerate(pipe.decoded_batches(batches(), SPEC, pipe.Stages(),
                                                            workers=2, ahead=2)):
        seen.append(len(pulled))
        assert isinstance(out[0][0], np.ndarray)
    assert len(seen) == 10
    assert all(p <= n + 1 + 2 for n, p in enumerate(seen))  # this batch and 2 ahead, no more


def test_enroll_json_reports_the_pipeline_stages(export_dir, gallery, tmp_path):
    photos, _ = gallery
    res = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", tmp_path / "i",
                  "--json", "--batch-size", 2)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert tuple(data["stages"]) == pipe.STAGES
    st = data["stages"]
    assert data["encoded"] == 6 and all(v >= 0 for v in st.values())
    assert st["decode"] > 0 and st["preprocess"] > 0 and st["encode"] > 0 and st["index"] > 0
    assert st["encode"] + st["index"] <= data["timings"]["encode"] + 1e-3

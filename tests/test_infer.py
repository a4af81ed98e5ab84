"""stbir_infer: encoders vs torch, enroll / query / info, the index dir's guarantees."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import stbir_infer
from stbir_infer import index as index_mod
from stbir_infer.cli import main
from stbir_infer.encoders import Encoders
from stbir_infer.errors import (EnrollError, ExportDirError, IndexLockedError, IndexNotFoundError,
                                ModelMismatchError, ParameterError, QueryError)
from stbir_infer.searcher import Searcher

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE, MAX_ABS = 0.99999, 1e-4
FORBIDDEN = ("torch", "torchvision", "open_clip", "models", "stbir_train", "stbir_export", "tqdm")


# -- helpers ------------------------------------------------------------------------------------------

def make_photos(folder: Path, names: list[str], seed: int = 0) -> dict[str, object]:
    """Synthetic photos (PNG) at ``folder/name``; returns name -> synth item."""
    from stbir_train.synth import render_photo, sample_item

    items = {}
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        item = sample_item(rng, name)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        render_photo(item, rng).save(path)
        items[name] = item
    return items


def make_sketch(path: Path, item, seed: int = 0) -> Path:
    from stbir_train.synth import render_sketch

    render_sketch(item, np.random.default_rng(seed)).save(path)
    return path


def run_cli(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result


def paths_in(idx_dir: Path) -> set[str]:
    return set(index_mod.GalleryIndex.load(idx_dir).files)


@pytest.fixture(scope="module")
def export_dir(small_export):
    return small_export


@pytest.fixture(scope="module")
def torch_model(small_checkpoint):
    from models import load_model

    model, _ = load_model(small_checkpoint)
    return model


@pytest.fixture(scope="module")
def encoders(export_dir):
    return Encoders(export_dir, threads=1)


@pytest.fixture()
def gallery(tmp_path):
    """A folder with 6 photos (2 in a subfolder), a corrupt image, a text file and a duplicate."""
    photos = tmp_path / "photos"
    items = make_photos(photos, ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "sub/f.png"])
    Image.open(photos / "a.png").save(photos / "full.jpg", quality=90)
    data = (photos / "full.jpg").read_bytes()
    (photos / "full.jpg").unlink()
    (photos / "corrupt.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (photos / "notes.txt").write_text("not a photo\n")
    shutil.copy(photos / "a.png", photos / "sub" / "a_copy.png")
    return photos, items


# -- the runtime never loads torch -----------------------------------------------------------------

def test_package_sources_do_not_import_torch_or_training_code():
    for src in (REPO / "stbir_infer").glob("*.py"):
        tree = ast.parse(src.read_text(), str(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{src.name} imports {name}"


def test_import_and_run_leave_torch_out_of_sys_modules(export_dir, gallery, tmp_path):
    photos, items = gallery
    sketch = make_sketch(tmp_path / "sketch.png", items["b.png"])
    script = textwrap.dedent(f"""
        import json, sys
        import stbir_infer
        from stbir_infer import Searcher
        from stbir_infer.cli import main
        s = Searcher({str(export_dir)!r}, {str(tmp_path / 'idx')!r}, threads=1)
        report = s.enroll({str(photos)!r}, batch_size=4)
        hits = s.query(sketch={str(sketch)!r}, text="a red star", top_k=3)
        s.info()
        rc = main(["query", "--model", {str(export_dir)!r}, "--index", {str(tmp_path / 'idx')!r},
                   "--text", "blue", "--json"], standalone_mode=False)
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in {FORBIDDEN!r})
        print(json.dumps({{"loaded": loaded, "hits": len(hits), "encoded": report.encoded}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["hits"] == 3 and out["encoded"] == 6


# -- encoders against the torch model ------------------------------------------------------------------

def test_runtime_embeddings_equal_the_torch_model(encoders, torch_model, tmp_path):
    import torch

    from stbir_train.synth import caption, render_sketch, sample_item

    rng = np.random.default_rng(3)
    items = [sample_item(rng, f"x{i}") for i in range(6)]
    photo_paths = [tmp_path / name for name in make_photos(tmp_path, [f"p{i}.png" for i in range(6)], seed=3)]
    sketches = [render_sketch(it, rng, size=s) for it, s in zip(items, (96, 64, 80, 120, 50, 96))]
    texts = [caption(it, rng) for it in items] + [
        "", "A RED STAR!!", " ".join(["very long caption"] * 30), "caf\u00e9 &amp; \U0001F600 \u6f22\u5b57"]
    img_spec, sk_spec = encoders.spec("image"), encoders.spec("sketch")
    assert img_spec == torch_model.input_specs()["image"]
    assert sk_spec == torch_model.input_specs()["sketch"]
    got = {"image": encoders.image(photo_paths), "sketch": encoders.sketch(sketches),
           "text": encoders.text(texts)}
    with torch.no_grad():
        want = {
            "image": torch_model.encode_image(torch.from_numpy(encoders.preprocess("image", photo_paths))),
            "sketch": torch_model.encode_sketch(torch.from_numpy(encoders.preprocess("sketch", sketches))),
            "text": torch_model.encode_text(torch_model.tokenizer()(texts)),
        }
    for branch in ("image", "sketch", "text"):
        a, b = got[branch], want[branch].numpy()
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert (a * b).sum(1).min() >= MIN_COSINE, branch
        assert np.abs(a - b).max() <= MAX_ABS, branch
    # Fusion: the export's weight, as the torch model fuses.
    with torch.no_grad():
        fused = torch_model.fuse(want["sketch"][:1], want["text"][:1]).numpy()[0]
    ours = encoders.fuse(got["sketch"][0], got["text"][0])
    assert encoders.fusion_weight == pytest.approx(float(torch_model.fusion_weight))
    assert float(ours @ fused) >= MIN_COSINE
    assert np.array_equal(encoders.fuse(None, got["text"][0]), got["text"][0])
    with pytest.raises(QueryError):
        encoders.fuse(None, None)


def test_export_dir_errors(tmp_path, export_dir):
    with pytest.raises(ExportDirError, match="not found"):
        Encoders(tmp_path / "nope")
    with pytest.raises(ExportDirError, match="no export.json"):
        Encoders(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    manifest = json.loads((bad / "export.json").read_text())
    (bad / "export.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ExportDirError, match="version 99"):
        Encoders(bad)
    (bad / "export.json").write_text(json.dumps(manifest))
    (bad / "image_encoder.onnx").unlink()
    with pytest.raises(ExportDirError, match="image_encoder.onnx is missing"):
        Encoders(bad)
    (bad / "image_encoder.onnx").write_bytes(b"garbage")
    enc = Encoders(bad)
    assert "image_encoder.onnx" in enc.verify_files()
    with pytest.raises(ExportDirError, match="onnxruntime cannot load"):
        enc.image([Image.new("RGB", (64, 64))])
    assert Encoders(export_dir).verify_files() == []
    res = run_cli("info", "--model", tmp_path / "nope", "--index", tmp_path / "idx")
    assert res.exit_code == 2 and res.stderr.startswith("stbir-infer: error: ")
    assert len(res.stderr.strip().splitlines()) == 1


# -- enroll --------------------------------------------------------------------------------------------

def test_enroll_skips_bad_files_and_encodes_duplicates_once(export_dir, gallery, tmp_path):
    photos, _ = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    r = s.enroll(photos, batch_size=4)
    assert (r.added, r.updated, r.removed, r.unchanged) == (7, 0, 0, 0)
    assert r.duplicates == 1 and r.encoded == 6 and r.total == 6
    assert r.skipped == 2
    reasons = {Path(p).name: why for p, why in r.skipped_files}
    assert set(reasons) == {"corrupt.jpg", "notes.txt"} and reasons["notes.txt"] == "not an image"
    assert "not a readable image" in reasons["corrupt.jpg"]
    info = s.info()
    assert info["images"] == 6 and info["files"] == 7
    assert info["hnsw"] == {"M": 16, "ef_construction": 200, "ef_search": 64, "ef_search_effective": 64}
    assert info["model"]["fingerprint"] == s.encoders.fingerprint
    # The duplicate is one result that names both paths.
    hits = s.query(text="anything", top_k=10)
    assert len(hits) == 6 and [h.rank for h in hits] == list(range(1, 7))
    dup = [h for h in hits if h.duplicates]
    assert len(dup) == 1 and {Path(dup[0].path).name, Path(dup[0].duplicates[0]).name} == {"a.png", "a_copy.png"}
    assert all(-1.0001 <= h.score <= 1.0001 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)
    # Stored paths are absolute; metadata holds hash, size and mtime.
    meta = index_mod.GalleryIndex.load(idx)
    rec = meta.files[str((photos / "b.png").resolve())]
    st = os.stat(photos / "b.png")
    assert rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns and len(rec["sha256"]) == 64
    # Nothing changed: nothing is encoded or even re-read.
    r2 = s.enroll(photos)
    assert (r2.added, r2.updated, r2.removed, r2.unchanged, r2.encoded, r2.skipped) == (0, 0, 0, 7, 0, 2)
    assert index_mod.current_generation(idx) == "gen-000001"  # no change, no new generation


def test_incremental_enroll_after_add_change_delete(export_dir, gallery, tmp_path):
    photos, items = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx, threads=1)
    s.enroll(photos, batch_size=4)
    before = paths_in(idx)
    # Add two, change one, delete one, touch one without changing it, delete the duplicate.
    make_photos(photos, ["new1.png", "sub/deeper/new2.png"], seed=7)
    make_photos(photos, ["c.png"], seed=8)  # new content at c.png
    (photos / "d.png").unlink()
    os.utime(photos / "b.png", ns=(1, 1))
    (photos / "sub" / "a_copy.png").unlink()
    r = s.enroll(photos, batch_size=2)
    assert (r.added, r.updated, r.removed) == (2, 1, 2)
    assert r.encoded == 3 and r.duplicates == 0 and r.skipped == 2
    assert r.unchanged == 4  # a, b (touched, same bytes), e, f
    after = paths_in(idx)
    root = photos.resolve()
    assert after == (before - {str(root / "d.png"), str(root / "sub" / "a_copy.png")}) | {
        str(root / "new1.png"), str(root / "sub" / "deeper" / "new2.png")}
    assert r.total == 7 == s.info()["images"]
    # The changed file's old vector is gone: querying with its new content finds it first.
    enc = s.encoders
    vec = enc.image([photos / "c.png"])[0]
    top = s.search(vec, top_k=1)[0]
    assert top.path == str(root / "c.png") and top.score > 0.9999
    # A copy of an indexed photo under a new name is not encoded again.
    shutil.copy(photos / "new1.png", photos / "again.png")
    r = s.enroll(photos)
    assert (r.added, r.duplicates, r.encoded) == (1, 1, 0)
    # Removing every copy of a content drops its vector; the slot is reused by the next add.
    (photos / "new1.png").unlink()
    (photos / "again.png").unlink()
    r = s.enroll(photos)
    assert r.removed == 2 and r.total == 6
    g = index_mod.GalleryIndex.load(idx)
    assert len(g.deleted_labels()) == 1
    make_photos(photos, ["z.png"], seed=9)
    assert s.enroll(photos).total == 7
    g = index_mod.GalleryIndex.load(idx)
    assert g.deleted_labels() == [] and g.hnsw.element_count == 7
    assert len(s.query(text="x", top_k=50)) == 7
    # A text file that becomes an image is picked up; an image that breaks leaves the index.
    shutil.copy(photos / "a.png", photos / "notes.txt")
    (photos / "b.png").write_bytes(b"truncated")
    r = s.enroll(photos)
    assert r.added == 1 and r.removed == 1 and r.skipped == 2 and r.duplicates == 1


def test_enroll_into_two_roots_and_bad_inputs(export_dir, tmp_path):
    make_photos(tmp_path / "one", ["a.png", "b.png"])
    make_photos(tmp_path / "two", ["c.png"], seed=4)
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx)
    s.enroll(tmp_path / "one")
    assert s.enroll(tmp_path / "two").total == 3  # another root does not remove the first
    assert len(s.info()["roots"]) == 2
    with pytest.raises(EnrollError, match="not found"):
        s.enroll(tmp_path / "missing")
    with pytest.raises(EnrollError, match="batch size"):
        s.enroll(tmp_path / "one", batch_size=0)
    # An index is never created inside a folder that holds other things.
    with pytest.raises(stbir_infer.IndexFormatError, match="its own dir"):
        Searcher(export_dir, tmp_path / "one").enroll(tmp_path / "two")
    # The index dir inside the photo folder is not enrolled.
    inner = Searcher(export_dir, tmp_path / "two" / ".." / "two" / "idx")
    assert inner.enroll(tmp_path / "two").total == 1
    res = run_cli("enroll", "--images", tmp_path / "missing", "--model", export_dir, "--index", idx)
    assert res.exit_code == 2 and "images dir not found" in res.stderr


def test_hnsw_parameters(export_dir, tmp_path):
    make_photos(tmp_path / "p", [f"{i}.png" for i in range(5)])
    idx = tmp_path / "idx"
    res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx,
                  "--hnsw-m", 8, "--ef-construction", 50, "--ef-search", 20, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["encoded"] == 5
    s = Searcher(export_dir, idx)
    assert {k: s.info()["hnsw"][k] for k in ("M", "ef_construction", "ef_search")} == {
        "M": 8, "ef_construction": 50, "ef_search": 20}
    g = index_mod.GalleryIndex.load(idx)
    assert g.hnsw.M == 8 and g.hnsw.ef_construction == 50
    # M cannot change on an existing index; ef_search can (it is a query-time setting).
    with pytest.raises(ParameterError, match="M=8"):
        Searcher(export_dir, idx, M=16).enroll(tmp_path / "p")
    res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx,
                  "--hnsw-m", 32)
    assert res.exit_code == 2 and "cannot change" in res.stderr
    assert Searcher(export_dir, idx, ef_search=3).query(text="a", top_k=5)  # ef raised to top_k
    assert len(Searcher(export_dir, idx, ef_search=1).query(text="a", top_k=5)) == 5
    with pytest.raises(ParameterError):
        Searcher(export_dir, idx, ef_search=0)
    with pytest.raises(ParameterError):
        index_mod.HnswParams(M=1)
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", idx, "--top-k", 0)
    assert res.exit_code == 2


# -- query ---------------------------------------------------------------------------------------------

def test_query_sketch_text_both_and_neither(export_dir, gallery, tmp_path):
    photos, items = gallery
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(photos)
    sketch = make_sketch(tmp_path / "sketch.png", items["c.png"])
    common = ["--model", export_dir, "--index", idx]
    outputs = {}
    for name, args in {"sketch": ["--sketch", sketch], "text": ["--text", "a red striped star"],
                       "both": ["--sketch", sketch, "--text", "a red striped star"]}.items():
        res = run_cli("query", *args, "--top-k", 3, "--json", *common)
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert [r["rank"] for r in data["results"]] == [1, 2, 3]
        assert all({"rank", "score", "path"} <= set(r) for r in data["results"])
        assert data["model"] == json.loads((export_dir / "export.json").read_text())["fingerprint"]
        outputs[name] = data
        plain = run_cli("query", *args, "--top-k", 3, *common)
        lines = plain.stdout.strip().splitlines()
        assert len(lines) == 3
        rank, score, path = lines[0].split(maxsplit=2)
        assert rank == "1" and path == data["results"][0]["path"]
        assert float(score) == pytest.approx(data["results"][0]["score"], abs=1e-4)
    assert outputs["both"]["query"]["fusion_weight"] == 0.5
    assert outputs["sketch"]["query"]["fusion_weight"] is None
    # The library gives the same ranking, and fuses as normalize(w*s + (1-w)*t).
    s = Searcher(export_dir, idx)
    both = s.query(sketch=sketch, text="a red striped star", top_k=3)
    assert [h.path for h in both] == [r["path"] for r in outputs["both"]["results"]]
    enc = s.encoders
    v = enc.sketch([sketch])[0] * 0.5 + enc.text(["a red striped star"])[0] * 0.5
    manual = s.search(v / np.linalg.norm(v), top_k=3)
    assert [h.path for h in manual] == [h.path for h in both]
    assert [h.score for h in manual] == pytest.approx([h.score for h in both], abs=1e-5)
    # Neither half: a usage error, one line, exit 2 (also for an empty --text).
    for args in ([], ["--text", "  "]):
        res = run_cli("query", *args, *common)
        assert res.exit_code == 2
        assert res.stderr.startswith("stbir-infer: error: ") and len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(QueryError):
        s.query()
    # A sketch that is not an image: exit 2, no traceback.
    (tmp_path / "bad.png").write_text("nope")
    res = run_cli("query", "--sketch", tmp_path / "bad.png", *common)
    assert res.exit_code == 2 and "not a readable image" in res.stderr
    assert "Traceback" not in res.output
    with pytest.raises(QueryError):
        s.query(sketch=tmp_path / "bad.png")


def test_query_without_index_and_info(export_dir, tmp_path):
    res = run_cli("query", "--text", "a", "--model", export_dir, "--index", tmp_path / "none")
    assert res.exit_code == 2 and "no index here yet" in res.stderr
    with pytest.raises(IndexNotFoundError):
        Searcher(export_dir, tmp_path / "none").query(text="a")
    res = run_cli("info", "--model", export_dir, "--index", tmp_path / "none", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["exists"] is False
    make_photos(tmp_path / "p", ["a.png"])
    env = {"STBIR_MODEL": str(export_dir), "STBIR_INDEX": str(tmp_path / "idx")}
    assert run_cli("enroll", "--images", tmp_path / "p", "-q", env=env).exit_code == 0
    res = run_cli("info", env=env)
    assert res.exit_code == 0 and "images 1" in res.stdout and "M 16" in res.stdout
    assert "stbir-small" in res.stdout


def test_long_lived_searcher_sees_other_writers(export_dir, tmp_path):
    make_photos(tmp_path / "p", ["a.png", "b.png"])
    idx = tmp_path / "idx"
    reader = Searcher(export_dir, idx)
    writer = Searcher(export_dir, idx)
    writer.enroll(tmp_path / "p")
    assert len(reader.query(text="x", top_k=10)) == 2
    make_photos(tmp_path / "p", ["c.png"], seed=5)
    writer.enroll(tmp_path / "p")
    assert len(reader.query(text="x", top_k=10)) == 3
    # Only the live generation and the one before it stay on disk.
    writer.enroll(tmp_path / "p")
    make_photos(tmp_path / "p", ["d.png"], seed=6)
    writer.enroll(tmp_path / "p")
    gens = sorted(p.name for p in idx.iterdir() if p.name.startswith("gen-"))
    assert gens == ["gen-000002", "gen-000003"] and (idx / "CURRENT").read_text().strip() == "gen-000003"


# -- the index dir's guarantees ------------------------------------------------------------------------

def test_index_from_another_export_is_refused(export_dir, tmp_path):
    make_photos(tmp_path / "p", ["a.png", "b.png"])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(tmp_path / "p")
    other = tmp_path / "other_export"
    shutil.copytree(export_dir, other)
    manifest = json.loads((other / "export.json").read_text())
    manifest["fingerprint"] = "f" * 64  # what a different checkpoint's export would carry
    (other / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="built with export"):
        Searcher(other, idx)
    for args in (["query", "--text", "a"], ["enroll", "--images", tmp_path / "p"], ["info"]):
        res = run_cli(*args, "--model", other, "--index", idx)
        assert res.exit_code == 2, res.output
        assert "index was built with export" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert len(Searcher(export_dir, idx).query(text="a")) == 2  # the index is untouched


def test_second_writer_is_refused(export_dir, tmp_path):
    make_photos(tmp_path / "p", ["a.png"])
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx)
    s.enroll(tmp_path / "p")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stbir_infer.index import WriterLock; "
         f"WriterLock({str(idx)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            s.enroll(tmp_path / "p")
        res = run_cli("enroll", "--images", tmp_path / "p", "--model", export_dir, "--index", idx)
        assert res.exit_code == 2 and "another process" in res.stderr
        assert len(s.query(text="a")) == 1  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    assert s.enroll(tmp_path / "p").unchanged == 1  # the OS released the dead holder's lock
    # In-process too: a writer that holds the lock refuses a second.
    with index_mod.writer_lock(idx):
        with pytest.raises(IndexLockedError):
            index_mod.WriterLock(idx).acquire()


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("point", ["meta_write", "meta_fsync", "gen_rename", "current_swap"])
def test_failure_mid_save_leaves_the_old_index(export_dir, gallery, tmp_path, monkeypatch, point):
    photos, _ = gallery
    idx = tmp_path / "idx"
    s = Searcher(export_dir, idx)
    s.enroll(photos)
    old_gen = index_mod.current_generation(idx)
    make_photos(photos, ["n1.png", "n2.png"], seed=11)

    real_replace = os.replace
    calls = {"replace": 0}

    def failing_replace(src, dst, *a, **k):
        calls["replace"] += 1
        if (point == "gen_rename" and calls["replace"] == 1) or (point == "current_swap" and calls["replace"] == 2):
            raise Boom(point)
        return real_replace(src, dst, *a, **k)

    if point == "meta_write":
        monkeypatch.setattr(index_mod.GalleryIndex, "meta", lambda self: (_ for _ in ()).throw(Boom()))
    elif point == "meta_fsync":
        monkeypatch.setattr(index_mod, "_fsync_file", lambda p: (_ for _ in ()).throw(Boom()))
    else:
        monkeypatch.setattr(index_mod.os, "replace", failing_replace)
    with pytest.raises(Boom):
        s.enroll(photos)
    monkeypatch.undo()
    assert index_mod.current_generation(idx) == old_gen
    assert len(Searcher(export_dir, idx).query(text="a", top_k=50)) == 6
    assert len(s.query(text="a", top_k=50)) == 6  # the live Searcher kept the old state too
    r = s.enroll(photos)  # the lock was released; leftovers are cleaned
    assert r.added == 2 and r.total == 8
    assert not [p for p in idx.iterdir() if p.name.startswith(".tmp-") or ".CURRENT.tmp" in p.name]


@pytest.mark.parametrize("when", ["mid_encode", "before_commit"])
def test_killed_enroll_leaves_a_loadable_index(export_dir, tmp_path, when):
    """SIGKILL during an enroll that checkpoints after every batch: the index left behind loads,
    holds the last committed state, and the next enroll finishes the job."""
    photos = tmp_path / "p"
    make_photos(photos, [f"old{i}.png" for i in range(3)])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(photos)
    make_photos(photos, [f"new{i}.png" for i in range(8)], seed=12)
    script = textwrap.dedent(f"""
        import os, signal
        from stbir_infer import Searcher, encoders, index
        when = {when!r}
        s = Searcher({str(export_dir)!r}, {str(idx)!r}, threads=1)
        calls = {{"encode": 0, "replace": 0}}
        real_encode, real_replace = encoders.Encoders.encode_pixels, os.replace
        def encode(self, branch, px):
            calls["encode"] += 1
            if when == "mid_encode" and calls["encode"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_encode(self, branch, px)
        def replace(src, dst):
            calls["replace"] += 1
            if when == "before_commit" and calls["replace"] == 4:  # 2nd checkpoint's CURRENT swap
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        encoders.Encoders.encode_pixels = encode
        os.replace = replace
        s.enroll({str(photos)!r}, batch_size=2, checkpoint_seconds=0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    g = index_mod.GalleryIndex.load(idx)
    # Two batches (4 new photos) were committed before the kill; the third was not.
    assert len(g) == 3 + (4 if when == "mid_encode" else 2)
    s = Searcher(export_dir, idx)
    assert len(s.query(text="a", top_k=50)) == len(g)
    r = s.enroll(photos)
    assert r.total == 11 and r.added == 11 - len(g) and r.encoded == r.added
    assert not [p for p in idx.iterdir() if p.name.startswith(".tmp-") or ".CURRENT.tmp" in p.name]


def test_cli_help_and_unknown_option(export_dir):
    res = run_cli("--help")
    assert res.exit_code == 0 and "enroll" in res.stdout and "query" in res.stdout
    res = run_cli("query", "--nope")
    assert res.exit_code == 2 and res.stderr.startswith("stbir-infer: error: No such option")
    assert len(res.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "stbir_infer", "query"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("stbir-infer: error:")


def test_int8_precision_uses_the_quantised_files(export_dir, tmp_path):
    with pytest.raises(ExportDirError, match="no int8 graph"):
        Encoders(export_dir, precision="int8")
    q = tmp_path / "q"
    shutil.copytree(export_dir, q)
    manifest = json.loads((q / "export.json").read_text())
    for branch in ("sketch", "image", "text"):  # stand-ins: the fp32 graphs under int8 names
        f = manifest["encoders"][branch]["file"]
        shutil.copy(q / f, q / f.replace(".onnx", ".int8.onnx"))
        manifest["encoders"][branch]["int8_file"] = f.replace(".onnx", ".int8.onnx")
    (q / "export.json").write_text(json.dumps(manifest))
    enc8, enc = Encoders(q, precision="int8"), Encoders(export_dir)
    assert np.allclose(enc8.text(["a red star"]), enc.text(["a red star"]), atol=1e-6)
    assert enc8.graph_file("text").name == "text_encoder.int8.onnx"
    with pytest.raises(ExportDirError):
        Encoders(export_dir, precision="fp16")

"""stbir_infer.Searcher: a long-lived reader follows writers, keeps serving the last good
generation, refuses another export's index; the runtime never loads torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from infer_helpers import FORBIDDEN, another_identity, make_photos, make_sketch, one_error_line, run_cli

from stbir_infer import store
from stbir_infer.errors import IndexFormatError, ModelMismatchError
from stbir_infer.searcher import Searcher


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


def test_a_searcher_keeps_serving_its_good_generation_when_a_bad_one_is_committed(
        export_dir, tmp_path, caplog):
    make_photos(tmp_path / "p", ["a.png", "b.png"])
    idx = tmp_path / "idx"
    writer = Searcher(export_dir, idx, threads=1)
    writer.enroll(tmp_path / "p")
    server = Searcher(export_dir, idx, threads=1)  # e.g. `stbir-infer serve`
    assert len(server.query(text="x", top_k=10)) == 2
    make_photos(tmp_path / "p", ["c.png"], seed=5)
    writer.enroll(tmp_path / "p")
    bin_path = idx / store.current_generation(idx) / "index.bin"
    good = bin_path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF
    bin_path.write_bytes(bytes(bad))  # same size: hnswlib would read it as valid
    with caplog.at_level(logging.WARNING, logger="stbir_infer"):
        for _ in range(3):
            hits = server.query(text="x", top_k=10)
            assert len(hits) == 2 and server.current_index().generation == 1
    assert "checksum" in server.load_error and server.info()["load_error"] == server.load_error
    assert len([r for r in caplog.records if "keeping generation 1" in r.getMessage()]) == 1
    # Nobody else gets the bad one either: a fresh reader has no good generation to keep.
    with pytest.raises(IndexFormatError, match="checksum"):
        Searcher(export_dir, idx)
    # Repaired: the next reload serves it.
    bin_path.write_bytes(good)
    server.reload()
    assert len(server.query(text="x", top_k=10)) == 3 and server.load_error is None


def test_index_from_another_export_is_refused(export_dir, tmp_path):
    make_photos(tmp_path / "p", ["a.png", "b.png"])
    idx = tmp_path / "idx"
    Searcher(export_dir, idx).enroll(tmp_path / "p")
    other = tmp_path / "other_export"
    shutil.copytree(export_dir, other)
    another_identity(other)  # another fingerprint, as a different checkpoint's export carries
    manifest = json.loads((other / "export.json").read_text())
    manifest["space"] = "e" * 64  # (its own weights: another embedding space, tests/infer/test_space.py)
    (other / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="embedding space"):
        Searcher(other, idx)
    for args in (["query", "--text", "a"], ["enroll", "--images", tmp_path / "p"], ["info"]):
        res = run_cli(*args, "--model", other, "--index", idx)
        assert res.exit_code == 2, res.output
        assert "embedding space" in res.stderr and one_error_line(res.stderr)
    assert len(Searcher(export_dir, idx).query(text="a")) == 2  # the index is untouched

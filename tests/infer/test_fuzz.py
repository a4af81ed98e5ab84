"""Issue 13's fuzz run at a test size: benchmarks/fuzz.py's cases (random and mutated images, the
known killers, hostile strings) through the HTTP API, Searcher.query and enroll rounds, in a child
process. ``python benchmarks/fuzz.py --cases 10000`` is the full run."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fuzz():
    path = REPO / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("stbir_bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_fuzz_small_run_is_clean(fuzz, export_dir):
    r = fuzz.run_in_child(export_dir, 40, seed=0, enroll_every=10, timeout=180)
    summary = {k: v for k, v in r.items() if k not in ("examples", "crashed_cases")}
    assert not r["crashed"] and not r.get("aborted"), r["crashed_cases"]
    assert r["cases"] == 40 and r["http_requests"] == 40 * 6, summary
    assert r["tracebacks"] == 0 and r["http_500s"] == 0 and r["http_bad_json"] == 0, r["examples"]
    assert r["enroll_failed"] == 0 and r["index_inconsistent"] == 0, r["examples"]
    assert r["index_changed_by_query"] == 0, summary
    assert r["enroll_rounds"] == 4 and r["enroll_added"] + r["enroll_skipped"] == 40, summary
    assert r["enroll_added"] > 0 and r["enroll_skipped"] > 0, summary
    assert r["query_ok"] > 0 and r["query_refused"] > 0, summary
    assert r["over_limit"] == 0 and max(r["peak_mb"].values()) < fuzz.PEAK_LIMIT_MB, summary
    assert r["peak_rss_above_baseline_mb"] < fuzz.PEAK_LIMIT_MB, summary
    assert fuzz.passed(r), summary


def test_the_killers_come_first(fuzz):
    names = [fuzz.image_case(random.Random(i), i)[0] for i in range(len(fuzz.KILLERS))]
    assert names == [name for name, _ in fuzz.KILLERS]
    for needed in ("strip 1x300000 png", "declared 30000x30000 png", "bomb 7000x7000 rgba png",
                   "bomb 7000x7000 16-bit png"):
        assert needed in names
    assert len(fuzz.png_bomb(7000, 7000, 6)) < 1_000_000  # a bomb: small file, 196 MB decoded


def test_a_crash_is_counted_and_the_run_goes_on(fuzz, export_dir):
    """A child that dies (here: abort() at case 1) is a counted crash; the next child resumes at
    the next case on the same gallery and index."""
    r = fuzz.run_in_child(export_dir, 3, seed=0, enroll_every=2, timeout=120,
                          env={"STBIR_FUZZ_CRASH_AT": "1"})
    assert r["crashed"] and r["crashes"] == 1 and not r.get("aborted"), r
    crash = r["crashed_cases"][0]
    assert crash["case"] == 1 and crash["returncode"] != 0, crash
    assert r["cases"] == 3 and r["tracebacks"] == 0 and r["index_inconsistent"] == 0, r
    assert r["enroll_rounds"] == 1 and r["enroll_added"] + r["enroll_skipped"] == 2, r
    assert not fuzz.passed(r)


def test_the_index_check_sees_lost_changed_missing_and_extra_entries(fuzz, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    sha_a, sha_b = fuzz._sha256(a), fuzz._sha256(b)
    old = {"/g/old.png": "1" * 64}
    good = {**old, str(a): sha_a}
    assert fuzz.check_round(old, good, good, [a, b], {str(b)}) == []
    cases = [
        ({str(a): sha_a}, "lost"),                          # an earlier entry dropped
        ({"/g/old.png": "2" * 64, str(a): sha_a}, "changed"),
        (old, "neither indexed nor skipped"),              # a new file that went nowhere
        ({**old, str(a): sha_b}, "another sha256"),
        ({**good, "/g/x.png": "3" * 64}, "unexpected"),
    ]
    for after, word in cases:
        problems = fuzz.check_round(old, after, after, [a, b], {str(b)})
        assert any(word in p for p in problems), (word, problems)
    problems = fuzz.check_round(old, good, old, [a, b], {str(b)})
    assert any("reloaded" in p for p in problems)


@pytest.fixture(scope="module")
def fuzz_files():
    path = REPO / "benchmarks" / "fuzz_files.py"
    spec = importlib.util.spec_from_file_location("stbir_bench_fuzz_files", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_crafted_index_files_are_refused_or_answer_right(fuzz_files):
    """Issue 26: 300 checksum-consistent edits of index.bin and meta.json (every header field,
    links, labels, vectors, every meta field), each loaded, searched, added to, saved and
    reloaded in a child: no signal, no traceback, no wrong answer."""
    r = fuzz_files.run_in_child(300, seed=0, timeout=600)
    assert r["cases"] == 300 and not r.get("aborted"), r
    assert r["signals"] == 0 and r["tracebacks"] == 0 and r["wrong_answers"] == 0, r["examples"]
    assert r["refused"] > 200 and r["accepted"] > 0, r
    assert any(k.startswith("header") for k in r["kinds"]) and "meta dim" in r["kinds"], r["kinds"]


def test_crafted_graph_outputs_are_refused(fuzz, fuzz_files, export_dir, tmp_path):
    """The combiner and the sketch encoder replaced by graphs of other output shapes or NaN."""
    photos, sketch = fuzz._graph_gallery(tmp_path)
    r = fuzz_files.graph_cases(export_dir, photos, sketch)
    assert r["tracebacks"] == 0 and r["wrong_answers"] == 0, r["examples"]
    assert r["cases"] == 18 and r["refused"] == 16 and r["accepted"] == 2, r

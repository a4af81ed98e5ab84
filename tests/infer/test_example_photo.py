"""Query by example photo (issue 28): ``query --image``, ``like`` (an enrolled photo's id), in
``--batch`` and ``Searcher``; the photo itself first, marked ``same_file``; bad photos refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from infer_helpers import make_photos, one_error_line, run_cli
from PIL import Image

from stbir_infer.errors import QueryError
from stbir_infer.fusion import DEFAULT_IMAGE_WEIGHT
from stbir_infer.searcher import Searcher

NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]


@pytest.fixture(scope="module")
def enrolled(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    make_photos(root / "photos", NAMES, seed=3)
    s = Searcher(export_dir, root / "idx", threads=1)
    s.enroll(root / "photos", batch_size=8)
    return s, root


def _cli(s, *args):
    return run_cli("query", "--model", s.encoders.model_dir, "--index", s.index_dir, *args)


def test_an_enrolled_photo_finds_itself_first_marked_same_file(enrolled):
    s, root = enrolled
    res = _cli(s, "--image", root / "photos" / "b.png", "--json", "-k", "4")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    first, rest = data["results"][0], data["results"][1:]
    assert first["path"].endswith("b.png") and first["same_file"] is True
    assert first["score"] > 0.999
    assert rest and all(r["same_file"] is False and r["score"] < first["score"] for r in rest)
    assert data["query"]["image"].endswith("b.png") and data["query"]["min_score"] is None
    text = _cli(s, "--image", root / "photos" / "b.png", "-k", "2").stdout.splitlines()
    assert text[0].endswith("(the example photo itself)") and "itself" not in text[1]


def test_a_re_encoded_copy_finds_its_original_but_is_not_the_same_file(enrolled, tmp_path):
    s, root = enrolled
    copy = tmp_path / "copy.jpg"
    Image.open(root / "photos" / "d.png").convert("RGB").resize((100, 100)).save(copy, quality=70)
    hits = s.query(image=str(copy), top_k=3)
    assert hits[0].path.endswith("d.png") and hits[0].same_file is False
    assert hits[0].score > hits[1].score


def test_photo_and_text_are_mixed_with_the_image_weight(enrolled):
    s, root = enrolled
    photo = str(root / "photos" / "c.png")
    img = s.encoders.image([photo])[0]
    txt = s.encoders.text(["a small blue circle"])[0]
    for w in (None, 0.2, 0.9):
        share = DEFAULT_IMAGE_WEIGHT if w is None else w
        want = (1 - share) * txt + share * img
        expected = s.search(want / np.linalg.norm(want), top_k=6)
        got = s.query(image=photo, text="a small blue circle", top_k=6, image_weight=w)
        assert [h.path for h in got] == [h.path for h in expected]
        assert np.allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
    res = _cli(s, "--image", photo, "--text", "a small blue circle", "--image-weight", "0.2",
               "--json")
    assert json.loads(res.stdout)["query"]["image_weight"] == 0.2


def test_like_uses_the_stored_vector_of_an_enrolled_photo(enrolled):
    s, root = enrolled
    idx = s.current_index()
    label = int(idx.files[str(root / "photos" / "e.png")]["label"])
    by_id = s.query(like=label, top_k=6)
    by_file = s.query(image=str(root / "photos" / "e.png"), top_k=6)
    assert [h.path for h in by_id] == [h.path for h in by_file]
    assert by_id[0].same_file and not any(h.same_file for h in by_id[1:])
    with pytest.raises(QueryError, match="no photo with id 999"):
        s.query(like=999)


def test_batch_lines_take_image_and_like(enrolled, tmp_path):
    s, root = enrolled
    lines = tmp_path / "q.jsonl"
    lines.write_text("\n".join(json.dumps(q) for q in (
        {"image": str(root / "photos" / "a.png"), "top_k": 2},
        {"like": 0, "text": "red", "top_k": 2},
        {"image": str(tmp_path / "nope.png")},
        {"image": 5})) + "\n")
    res = _cli(s, "--batch", lines)
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.exit_code == 2 and len(out) == 4
    assert out[0]["results"][0]["same_file"] is True and out[0]["results"][0]["path"].endswith("a.png")
    assert out[1]["query"]["like"] == 0 and out[1]["query"]["image_weight"] == DEFAULT_IMAGE_WEIGHT
    assert out[2]["error"].startswith("image: ") and "must be a file path" in out[3]["error"]


def _bad_photos(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a photo at all\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    big = io.BytesIO()
    Image.new("1", (10_001, 5_000)).save(big, format="PNG")  # 50.005 MP, a few KB on disk
    (tmp_path / "huge.png").write_bytes(big.getvalue())
    return {"notes.jpg": "image: ", "empty.jpg": "image: ", "huge.png": "megapixels"}


def test_bad_example_photos_are_one_line_and_exit_2(enrolled, tmp_path):
    s, _ = enrolled
    for name, words in _bad_photos(tmp_path).items():
        res = _cli(s, "--image", tmp_path / name)
        assert res.exit_code == 2 and one_error_line(res.stderr), (name, res.output)
        assert words in res.stderr and "Traceback" not in res.output
    res = _cli(s, "--image", tmp_path / "missing.jpg")
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_a_photo_not_in_the_index_gets_the_honest_answer(enrolled, tmp_path):
    s, _ = enrolled
    other = tmp_path / "other.png"
    make_photos(tmp_path, ["other.png"], seed=99)
    hits = s.query(image=str(other), top_k=6)
    assert len(hits) == 6 and not any(h.same_file for h in hits)

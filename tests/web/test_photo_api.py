"""POST /api/query with an example photo (issue 28): an uploaded photo (multipart or base64 JSON)
or ``like`` (an index id), ``where`` lines, ``same_file`` on the photo itself; /api/health's
limits and per-mode thresholds, which the page reads."""

from __future__ import annotations

import base64

from stbir_infer.query_spec import MAX_TEXT_CHARS


def _label(searcher, name: str) -> int:
    idx = searcher.current_index()
    return next(int(r["label"]) for p, r in idx.files.items() if p.endswith(name))


def test_an_uploaded_photo_finds_itself_marked_same_file(client, gallery):
    _, _, photos, _ = gallery
    data = (photos / "photo_04.png").read_bytes()
    status, out = client.query_form({"top_k": "3"}, {"image": ("p.png", data, "image/png")})
    assert status == 200, out
    first, rest = out["results"][0], out["results"][1:]
    assert first["name"] == "photo_04.png" and first["same_file"] is True
    assert all(r["same_file"] is False for r in rest)
    assert out["query"]["image"] is True and out["query"]["mode"] == "image"
    status, out = client.query_json({"image": base64.b64encode(data).decode(), "top_k": 2})
    assert status == 200 and out["results"][0]["same_file"] is True


def test_like_an_index_id_and_where_lines(client, searcher):
    label = _label(searcher, "photo_07.png")
    status, out = client.query_form({"like": str(label), "top_k": "4"})
    assert status == 200 and out["results"][0]["id"] == label and out["results"][0]["same_file"]
    status, out = client.query_form({"like": "999999", "top_k": "4"})
    assert status == 400 and "no photo with id 999999" in out["error"]
    status, out = client.query_form({"text": "a star", "where": "folder=nowhere\n"})
    assert status == 200 and out["results"] == [] and out["query"]["where"] == {"folder": ["nowhere"]}
    status, out = client.query_form({"text": "a star", "where": "kind=pet"})
    assert status == 400 and "no entry has a tag 'kind'" in out["error"]
    status, out = client.query_form({"like": "3", "image": "x"})
    assert status == 400


def test_bad_photos_are_400(client):
    for data, words in ((b"", "image: empty file"), (b"not an image", "image: not an image")):
        status, out = client.query_form({}, {"image": ("p.jpg", data, "image/jpeg")})
        assert status == 400 and words in out["error"], out


def test_health_gives_the_page_its_limits_and_thresholds(client):
    status, h = client.json("GET", "/api/health")
    assert status == 200 and h["limits"]["max_text"] == MAX_TEXT_CHARS
    assert isinstance(h["score_thresholds"], dict)
    assert all(isinstance(v, float) for v in h["score_thresholds"].values())

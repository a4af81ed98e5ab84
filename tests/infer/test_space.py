"""Embedding spaces at the edge (seed 004): an index enrolled with a teacher's export answers
queries from a student distilled into the teacher's space, and refuses any other export."""

from __future__ import annotations

import json

import pytest
from infer_helpers import make_photos, one_error_line, run_cli

from stbir_infer import Searcher
from stbir_infer.contract import embedding_space
from stbir_infer.encoders import Encoders
from stbir_infer.errors import ModelMismatchError


def _student_export(tmp, name: str, distill: dict | None):
    """A random tiny-preset checkpoint (with ``distill`` as stbir-train distill records it) ->
    export dir."""
    import torch

    from models import PRESETS, ModelSpec, build_model, save_checkpoint
    from stbir_export import export_checkpoint

    torch.manual_seed(len(name))
    model = build_model(ModelSpec(**PRESETS["tiny"]))
    extra = {"distill": distill} if distill else {}
    ckpt = save_checkpoint(tmp / f"{name}.pt", model, config={}, metrics={}, **extra)
    export_checkpoint(ckpt, tmp / name, verify=False, log=lambda *a, **k: None)
    return tmp / name


@pytest.fixture(scope="module")
def spaces(small_checkpoint, small_export, tmp_path_factory):
    """(teacher export, its index over 5 photos, the photos, a student in its space, one in
    another space)."""
    from models import load_model
    from models.space import embedding_space as model_space

    teacher_model, meta = load_model(small_checkpoint)
    space = model_space(teacher_model, meta)
    tmp = tmp_path_factory.mktemp("spaces")
    photos = tmp / "photos"
    make_photos(photos, [f"p{i}.png" for i in range(5)])
    index = tmp / "index"
    Searcher(small_export, index, threads=1).enroll(photos)
    record = {"space": space, "teacher": {"file": small_checkpoint.name, "sha256": "ab" * 32}}
    matching = _student_export(tmp, "student", record)
    other = _student_export(tmp, "stranger", {**record, "space": "0" * 64})
    return {"teacher": small_export, "index": index, "photos": photos, "space": space,
            "student": matching, "stranger": other}


def test_export_json_carries_the_space_teacher_own_student_its_teachers(spaces):
    teacher = json.loads((spaces["teacher"] / "export.json").read_text())
    student = json.loads((spaces["student"] / "export.json").read_text())
    assert teacher["space"] == spaces["space"] == student["space"]
    assert "teacher" not in teacher
    assert student["teacher"]["file"] == "small.pt"
    assert student["fingerprint"] != teacher["fingerprint"]  # another export, the same space
    assert Encoders(spaces["student"]).model_record()["space"] == spaces["space"]


def test_a_student_in_the_teachers_space_queries_the_teachers_index(spaces):
    searcher = Searcher(spaces["student"], spaces["index"], threads=1)
    hits = searcher.query(text="a red striped star", top_k=5)
    assert len(hits) == 5
    # the scores are the student's text vector against the teacher's photo vectors
    teacher = Encoders(spaces["teacher"], threads=1)
    q = searcher.encoders.text(["a red striped star"])[0]
    for hit in hits:
        photo = teacher.image([hit.path])[0]
        assert hit.score == pytest.approx(float(q @ photo), abs=1e-4)
    # writing still takes the export that built the index
    with pytest.raises(ModelMismatchError, match="index was built with export"):
        searcher.enroll(spaces["photos"])


def test_an_export_of_another_space_is_refused_with_one_line(spaces):
    with pytest.raises(ModelMismatchError, match="embedding space"):
        Searcher(spaces["stranger"], spaces["index"], threads=1)
    result = run_cli("query", "--model", spaces["stranger"], "--index", spaces["index"],
                     "--text", "a red star")
    assert result.exit_code == 2 and one_error_line(result.stderr)
    assert "embedding space" in result.stderr and spaces["space"][:12] in result.stderr
    ok = run_cli("query", "--model", spaces["student"], "--index", spaces["index"],
                 "--text", "a red star", "--top-k", "2")
    assert ok.exit_code == 0, ok.stderr


def test_exports_and_indexes_without_a_space_match_only_their_own_export():
    assert embedding_space({"fingerprint": "f1"}) == "f1"
    assert embedding_space({"fingerprint": "f1", "space": "s"}) == "s"
    assert embedding_space({"fingerprint": "f1", "space": None}) == "f1"

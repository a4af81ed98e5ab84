"""The text graph takes fewer tokens than the context length (models/causal_text.py): the export
measures that dropping the tokens after the last end-of-text changes no vector and records
``trim_tokens``; the runtime then feeds only those tokens and gets the full-length vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stbir_export import export_checkpoint
from stbir_infer.encoders import Encoders
from stbir_infer.errors import ExportDirError

TEXTS = ["red", "a small blue square made of wood", ""]


def _fed_token_counts(enc, monkeypatch) -> list[int]:
    counts, real = [], enc._run
    monkeypatch.setattr(enc, "_run", lambda branch, feeds: counts.append(
        feeds["token_embeddings"].shape[1]) or real(branch, feeds))
    return counts


def _all_tokens(enc, texts) -> np.ndarray:
    ids = enc.tokenizer(texts)
    return enc.session("text").run(None, {
        "token_embeddings": np.ascontiguousarray(enc.token_table[ids], np.float32),
        "eot_position": ids.argmax(-1).astype(np.int64)})[0]


def test_the_graphs_attention_is_open_clips_on_all_or_fewer_tokens(small_checkpoint):
    from models import load_model

    model, _ = load_model(small_checkpoint)
    tokens = model.tokenizer()(TEXTS)
    eot = tokens.argmax(-1)
    n = int(eot.max()) + 1
    with torch.no_grad():
        want = model.encode_text(tokens)  # open_clip's own blocks, all tokens
        emb = model.clip.token_embedding(tokens)
        for got in (model.encode_text_graph(emb, eot), model.encode_text_graph(emb[:, :n], eot)):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_the_runtime_feeds_tokens_up_to_the_last_end_of_text_with_the_same_vectors(
        small_export, monkeypatch):
    enc = Encoders(small_export, threads=1)
    assert enc.manifest["encoders"]["text"]["trim_tokens"] is True
    counts = _fed_token_counts(enc, monkeypatch)
    got = enc.text(TEXTS)
    ids = enc.tokenizer(TEXTS)
    assert counts == [int(ids.argmax(-1).max()) + 1] and counts[0] < ids.shape[1]
    np.testing.assert_allclose(got, _all_tokens(enc, TEXTS), atol=2e-6)
    np.testing.assert_allclose(enc.text(["red"])[0], got[0], atol=2e-6)  # 3 tokens alone
    assert counts[-1] == 3


def test_a_text_graph_that_bakes_its_token_count_is_not_trimmed(small_checkpoint, tmp_path,
                                                                 monkeypatch):
    from models import causal_text

    # nn.MultiheadAttention as open_clip runs it: the traced length ends up in the graph
    monkeypatch.setattr(causal_text, "_plain", lambda block: False)
    lines: list[str] = []
    out = tmp_path / "export"
    manifest = export_checkpoint(small_checkpoint, out, verify=False, log=lines.append)
    assert manifest["encoders"]["text"]["trim_tokens"] is False
    assert any("does not trim" in line for line in lines)
    enc = Encoders(out, threads=1)
    counts = _fed_token_counts(enc, monkeypatch)
    np.testing.assert_allclose(enc.text(TEXTS), _all_tokens(enc, TEXTS), atol=2e-6)
    assert counts == [enc.tokenizer.context_length]
    # export.json edited to claim it: the run fails as a one-line export error, not a crash
    manifest["encoders"]["text"]["trim_tokens"] = True
    (out / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportDirError, match="text_encoder.onnx: onnxruntime could not run it"):
        Encoders(out, threads=1).text(["red"])

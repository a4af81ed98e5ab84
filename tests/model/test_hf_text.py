"""A Hugging Face sentence encoder as the text tower (models/hf_text.py): built by open_clip from
a local folder, tokenized by the runtime's own tokenizer, locked or partly tuned, split for the
pretrain caches, carried whole by a checkpoint, and refused with one line when the folder is wrong."""

from __future__ import annotations

import json
import random
import shutil
import string

import numpy as np
import pytest
import torch

EDGE = dict(clip_model="stbir-edge", sketch_backbone="mobilenet_v2", sketch_size=48, image_size=64)


def _model(folder, **kw):
    from models import ModelSpec, build_model

    torch.manual_seed(0)
    return build_model(ModelSpec(**EDGE, text_model=str(folder), **kw))


def _strings(n: int = 1200) -> list[str]:
    """Unicode, accents, HTML entities, punctuation, long, empty and whitespace-only strings."""
    rng = random.Random(7)
    pieces = ["a", "dog", "Café", "crème brûlée", "naïve", "ÀÉÎÕÜ", "日本語", "emoji 😀", "&amp;",
              "&lt;b&gt;", "don't", "rock'n'roll", "U.S.A.", "3.14", "42x", "--", "...", "\t", "\n",
              "  ", "ß", "Ωmega", "Straße", "ﬁne", "١٢٣", "привет", "x" * 40, "#hash", "@at"]
    out = ["", " ", "\n\t ", "a", "A RED DOG!!!", " ".join(["long"] * 300)]
    while len(out) < n:
        k = rng.randint(1, 12)
        words = [rng.choice(pieces) if rng.random() < 0.6 else
                 "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 8)))
                 for _ in range(k)]
        out.append(rng.choice([" ", "", "  ", ", "]).join(words))
    return out


def _transformers_ids(folder, texts, context_length):
    """The ids of transformers' own tokenizer for the folder, after open_clip's HF cleaning
    (what open_clip.tokenizer.HFTokenizer does)."""
    from open_clip.tokenizer import get_clean_fn
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    clean = get_clean_fn("whitespace")
    return tok([clean(t) for t in texts], padding="max_length", max_length=context_length,
               truncation=True, return_tensors="np").input_ids


def test_runtime_tokenizer_equals_transformers_on_1000_strings(tiny_bert):
    model = _model(tiny_bert)
    texts = _strings()
    assert len(texts) >= 1000
    ours = model.tokenizer()(texts).numpy()
    assert ours.shape == (len(texts), 64)
    np.testing.assert_array_equal(ours, _transformers_ids(tiny_bert, texts, 64))


def test_real_minilm_tokenizer_equals_transformers(real_text_model):
    folder = real_text_model
    from models.hf_text import read_text_model
    from stbir_infer.hf_tokenizer import HFTokenizer

    files = read_text_model(folder)
    tok = HFTokenizer(files["tokenizer.json"], context_length=64)
    texts = _strings()
    np.testing.assert_array_equal(tok(texts), _transformers_ids(folder, texts, 64))
    assert tok.vocab_size == json.loads(files["config.json"])["vocab_size"] == 30522


def test_encode_text_matches_the_graph_form_and_ignores_padding(tiny_bert):
    model = _model(tiny_bert).eval()
    ids = model.tokenizer()(["a red dog", "", "the man running on the grass " * 3])
    mask = (ids != 0).long()
    with torch.no_grad():
        full = model.encode_text(ids)
        graph = model.encode_text_graph(model.token_table[ids], mask)
        n = int(mask.sum(1).max())
        cut = model.encode_text_graph(model.token_table[ids[:, :n]], mask[:, :n])
        alone = model.encode_text(ids[:1])
    assert full.shape == (3, model.embed_dim)
    torch.testing.assert_close(graph, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, full[:1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("unlocked, learning", [(-1, {"embeddings", "layer.0", "layer.1", "proj"}),
                                                (0, {"proj"}), (1, {"layer.1", "proj"})])
def test_text_tower_locks_what_it_is_told(tiny_bert, unlocked, learning):
    model = _model(tiny_bert, text_unlocked_layers=unlocked)
    model.configure_stage("text")
    names = [n for n, p in model.clip.text.named_parameters() if p.requires_grad]
    found = {part for n in names for part in ("embeddings", "layer.0", "layer.1", "proj")
             if part in n}
    assert found == learning
    model.train()
    assert model.clip.text.transformer.training == (unlocked != 0)  # a locked tower: no dropout


def test_trunk_layers_learn_at_their_own_rate(tiny_bert):
    model = _model(tiny_bert, text_unlocked_layers=1, trunk_lr_scale=0.1)
    model.configure_stage("text")
    heads, trunk = model.param_groups(1e-3)
    assert heads["lr"] == pytest.approx(1e-3) and trunk["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in trunk["params"]} <= {id(p) for p in model.clip.text.transformer.parameters()}
    assert any(p is model.clip.text.proj.weight for p in heads["params"])


def test_frozen_splits_are_exact(tiny_bert):
    from models.frozen import image_split, text_split

    model = _model(tiny_bert, text_unlocked_layers=0, image_unlocked_layers=3)
    model.configure_stage("all")
    model.train()
    prefix, rest = image_split(model)
    assert not any(p.requires_grad for p in prefix.parameters())
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(rest(prefix(x)), model.encode_image(x), atol=1e-6, rtol=0)
    features, head = text_split(model)
    ids = model.tokenizer()(["a red dog", "blue square on the grass", ""])
    torch.testing.assert_close(head(features(ids)), model.encode_text(ids), atol=1e-6, rtol=0)
    assert image_split(_model(tiny_bert)) is None  # every layer learns: nothing to cache
    assert text_split(_model(tiny_bert, text_unlocked_layers=1)) is None


def test_checkpoint_carries_the_text_model(tiny_bert, tmp_path):
    from models import load_model, save_checkpoint

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    model = _model(folder, text_proj="mlp").eval()
    path = save_checkpoint(tmp_path / "m.pt", model, config={})
    shutil.rmtree(folder)  # the checkpoint alone rebuilds it
    again, _ = load_model(path)
    ids = model.tokenizer()(["a red dog on the grass"])
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(ids), model.encode_text(ids))


def test_the_real_weights_load(tiny_bert):
    """The folder's weights reach the tower (not a random init): the word table is the file's."""
    from safetensors.torch import load_file

    model = _model(tiny_bert)
    saved = load_file(str(tiny_bert / "model.safetensors"))
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.token_table, saved[key])


def _broken(tiny_bert, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(tiny_bert, folder)
    if how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "other-family":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif how == "vocab-mismatch":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 7}))
    elif how == "pickled-weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif how == "not-json":
        (folder / "config.json").write_text("{not json")
    return folder


@pytest.mark.parametrize("how, says", [
    ("missing", "not a folder"), ("no-tokenizer", "tokenizer.json is missing"),
    ("other-family", "BERT-family"), ("vocab-mismatch", "does not match the model"),
    ("pickled-weights", "model.safetensors is missing"), ("not-json", "config.json is not JSON")])
def test_a_wrong_text_model_folder_is_one_model_error(tiny_bert, tmp_path, how, says):
    from models import ModelError

    folder = tmp_path / "nowhere" if how == "missing" else _broken(tiny_bert, tmp_path, how)
    with pytest.raises(ModelError, match=says):
        _model(folder)

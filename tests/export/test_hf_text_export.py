"""A Hugging Face text tower through train -> export -> the torch-free runtime: a tiny random BERT
(written by the test) trained on the built-in data, exported with its vocabulary table detached
and its tokenizer.json verified, answered by onnxruntime as transformers answers; and a wrong
text-model folder is one line and exit 2 with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def hf_run(tiny_dataset, tiny_bert, tmp_path_factory, write_config):
    """(checkpoint, export dir, export.json): the seed's staged schedule (sketch, image, text;
    the text tower is the first two stages' anchor) on the tiny preset with the tiny BERT."""
    from stbir_export import export_checkpoint
    from stbir_train.config import load_config
    from stbir_train.train import train

    tmp = tmp_path_factory.mktemp("hf-run")
    config = write_config(tiny_dataset, tmp, **{
        "model.preset": "tiny", "model.text_model": str(tiny_bert), "model.text_proj": "mlp",
        "model.text_unlocked_layers": 1, "model.trunk_lr_scale": 0.5,
        "training.stages": [{"target": t, "epochs": 1, "lr": 1e-3}  # the seed's schedule
                            for t in ("sketch", "image", "text")]})
    summary = train(load_config(config), log=lambda *a, **k: None)
    ckpt = summary["last_path"]
    manifest = export_checkpoint(ckpt, tmp / "export", quantize="int8", log=lambda *a, **k: None)
    return ckpt, tmp / "export", manifest


def test_training_moved_only_what_the_stage_unlocked(hf_run, tiny_bert):
    from safetensors.torch import load_file

    from models import load_model

    model, _ = load_model(hf_run[0])
    saved = load_file(str(tiny_bert / "model.safetensors"))
    now = model.clip.text.transformer.state_dict()
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(now[key], saved[key])  # the embeddings stayed locked
    top = [k for k in saved if k.startswith(("encoder.layer.1.", "layer.1."))]
    assert top and any(not torch.equal(now[k], saved[k]) for k in top)  # the top layer learned


def test_export_records_the_hf_text_graph(hf_run):
    _, out, manifest = hf_run
    text = manifest["encoders"]["text"]
    assert [i["name"] for i in text["inputs"]] == ["token_embeddings", "attention_mask"]
    assert manifest["tokenizer"]["type"] == "hf_tokenizers"
    assert manifest["tokenizer"]["file"] in manifest["files"]
    table = np.load(out / "token_embedding.npy", allow_pickle=False)
    assert table.shape[0] == manifest["tokenizer"]["vocab_size"]
    assert text["trim_tokens"] is True
    check = manifest["verification"]["text"]
    assert check["min_cosine"] >= 0.99999 and check["max_abs_diff"] <= 1e-4
    assert manifest["quantization"]["int8"]["cosine_to_fp32"]["text"] >= 0.99


def test_runtime_text_vectors_equal_transformers(hf_run, tiny_bert):
    """onnxruntime through the shipped table and tokenizer.json against the checkpoint's torch
    tower, and its transformer against transformers' BertModel loaded the usual way."""
    from transformers import BertModel

    from models import load_model
    from stbir_infer.encoders import Encoders

    ckpt, out, _ = hf_run
    model, _ = load_model(ckpt)
    texts = ["a red dog on the grass", "", "Café &amp; THE blue circle!!", "x " * 200, "日本語"]
    got = Encoders(out).text(texts)
    with torch.no_grad():
        want = model.encode_text(model.tokenizer()(texts)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The tower's transformer is transformers' own BERT with the trained weights.
    bert = BertModel.from_pretrained(str(tiny_bert), add_pooling_layer=False).eval()
    bert.load_state_dict(model.clip.text.transformer.state_dict())
    ids = model.tokenizer()(texts)
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        ref = torch.nn.functional.normalize(model.clip.text.proj(pooled), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_runtime_feeds_only_real_tokens(hf_run):
    from stbir_infer.encoders import Encoders

    enc = Encoders(hf_run[1])
    feeds = enc.text_feeds(["a red dog"])
    assert feeds["token_embeddings"].shape[1] == feeds["attention_mask"].shape[1] < 64
    assert feeds["attention_mask"].all()
    batch = enc.text(["a red dog", "the man running on the green grass"])
    alone = enc.text(["a red dog"])
    np.testing.assert_allclose(batch[:1], alone, atol=1e-5)  # padding in a batch changes nothing


def test_int8_text_tower_stays_close(hf_run):
    from stbir_infer.encoders import Encoders

    texts = ["a red dog on the grass", "blue square", "the man"]
    fp32 = Encoders(hf_run[1]).text(texts)
    int8 = Encoders(hf_run[1], precision="int8").text(texts)
    assert ((fp32 * int8).sum(1) >= 0.99).all()


def test_a_tampered_tokenizer_json_is_refused(hf_run, tmp_path):
    from stbir_infer.encoders import Encoders
    from stbir_infer.errors import ExportDirError

    out = tmp_path / "export"
    shutil.copytree(hf_run[1], out)
    tok = out / "tokenizer" / "tokenizer.json"
    data = json.loads(tok.read_text())
    data["model"]["vocab"]["dog"], data["model"]["vocab"]["man"] = (data["model"]["vocab"]["man"],
                                                                    data["model"]["vocab"]["dog"])
    tok.write_text(json.dumps(data))
    with pytest.raises(ExportDirError, match="sha256"):
        Encoders(out).text(["a dog"])


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stbir_train.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("how", ["missing", "no-tokenizer", "other-family", "vocab-mismatch"])
def test_sketchify_refuses_a_wrong_text_model_in_one_line(tiny_bert, tmp_path, how):
    """One line on stderr, exit 2, no data written (checked before any sketch is drawn)."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 10, 10)).save(photos / f"p{i}.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(
        f"p{i}.jpg,a photo {i}\n" for i in range(3)))
    folder = tmp_path / "bert"
    if how != "missing":
        shutil.copytree(tiny_bert, folder)
        cfg = json.loads((folder / "config.json").read_text())
        if how == "no-tokenizer":
            (folder / "tokenizer.json").unlink()
        elif how == "other-family":
            (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
        else:
            (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 99}))
    out = tmp_path / "data"
    proc = _cli("sketchify", photos, tmp_path / "captions.csv", out, "--test", "1",
                "--text-model", folder, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "text_model" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_real_minilm_exports_and_answers_like_transformers(tmp_path, real_text_model):
    """The real all-MiniLM-L6-v2 (when this machine has it): export parity, and the runtime's
    sentence vectors before any training equal sentence-transformers' recipe (mean pooling)."""
    folder = real_text_model
    from models import ModelSpec, build_model, save_checkpoint
    from stbir_export import export_checkpoint
    from stbir_infer.encoders import Encoders

    torch.manual_seed(0)
    model = build_model(ModelSpec(clip_model="stbir-tiny", sketch_backbone="mobilenet_v2",
                                  sketch_size=48, text_model=str(folder), image_size=32))
    with torch.no_grad():  # an identity projection: the runtime then returns MiniLM's own vector
        model.clip.text.proj.weight.copy_(torch.eye(model.embed_dim, 384))
    ckpt = save_checkpoint(tmp_path / "minilm.pt", model, config={})
    manifest = export_checkpoint(ckpt, tmp_path / "export", log=lambda *a, **k: None)
    assert manifest["verification"]["text"]["min_cosine"] >= 0.99999
    texts = ["a dog running on grass", "two children play in the snow", "Café crème"]
    got = Encoders(tmp_path / "export").text(texts)
    from transformers import AutoModel, AutoTokenizer

    tok, bert = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder))
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None]
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    want = torch.nn.functional.normalize(want[:, :model.embed_dim], dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)

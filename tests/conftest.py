"""Shared fixtures: small random-init checkpoints (no downloads, no training)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A random-init checkpoint of the small preset (resnet18 sketch tower, stbir-small towers)."""
    import torch

    from models import ModelSpec, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec())
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, model, config={}, metrics={})
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The built-in dataset at a test size: 4 categories x 12 training / 6 test photos."""
    from stbir_train.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, per_category=12, test_per_category=6, sketches_per_photo=2, seed=3)
    return root


def make_config(dataset_root, tmp_path, **overrides):
    """A fast training config on ``dataset_root`` writing under ``tmp_path``; ``overrides`` are
    dotted keys, e.g. ``{"training.batch_size": 4}``. Returns the config file's path."""
    import yaml

    data = yaml.safe_load((dataset_root / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["data"]["root"] = str(dataset_root)
    data["training"].update(batch_size=8, num_workers=0, val_every=None)  # once an epoch
    data["training"]["stages"] = [{"target": "all", "epochs": 1, "lr": 1e-4, "weight_decay": 0.01}]
    data["data"]["val_fraction"] = 0.15
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def small_export(small_checkpoint, tmp_path_factory):
    """``small_checkpoint`` exported by stbir_export (fp32 graphs, verified against torch)."""
    from stbir_export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "export"
    export_checkpoint(small_checkpoint, out, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def write_config():
    """``make_config`` as a fixture: ``import conftest`` is ambiguous once sub-folders of tests/
    have their own conftest.py."""
    return make_config


@pytest.fixture(scope="session")
def small_export_int8(small_checkpoint, tmp_path_factory):
    """``small_checkpoint`` exported with int8 variants: (dir, export.json dict, printed log)."""
    from stbir_export import export_checkpoint

    out = tmp_path_factory.mktemp("export-int8") / "small"
    lines: list[str] = []
    manifest = export_checkpoint(small_checkpoint, out, quantize="int8", log=lines.append)
    return out, manifest, "\n".join(lines)


@pytest.fixture(scope="session")
def evil_checkpoint(tmp_path_factory):
    """(a .pt whose pickle would create ``marker`` when loaded unsafely, the marker's path).

    It looks like an STBIR checkpoint from outside: the same format keys, plus one object whose
    ``__reduce__`` calls ``exec``. ``torch.load(weights_only=True)`` must refuse it unrun."""
    import torch

    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "PWNED"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    path = folder / "bad.pt"
    torch.save({"format": "stbir-checkpoint", "format_version": 1, "model_spec": {},
                "model": {}, "config": {}, "payload": Payload()}, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture(scope="session")
def combiner_export(tmp_path_factory):
    """A small-preset checkpoint with a (perturbed, so not the plain mean) Combiner that validation
    "preferred", default weight 0.6 and score thresholds, exported: (dir, export.json, checkpoint)."""
    import torch

    from models import ModelSpec, build_model, save_checkpoint
    from stbir_export import export_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec(combiner=True, train_sketch_weight=0.5))
    with torch.no_grad():
        for p in model.combiner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.combiner.preferred.fill_(1.0)
        model.query_sketch_weight.fill_(0.6)
    tmp = tmp_path_factory.mktemp("combiner")
    ckpt = save_checkpoint(tmp / "combiner.pt", model, config={}, metrics={}, fusion_selection={
        "weight": 0.6, "method": "combiner"}, score_thresholds={"split": "val", "modes": {
            m: {"0.01": 0.1, "0.001": 0.2, "0.0001": 0.3} for m in ("sketch", "text", "sketch+text")}})
    manifest = export_checkpoint(ckpt, tmp / "export", log=lambda *a, **k: None)
    return tmp / "export", manifest, ckpt


def write_tiny_bert(dest, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised BERT in the Hugging Face layout (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json): a WordPiece vocabulary of characters, '##'
    continuations and a few words, so any text tokenizes. No download, under a second."""
    import json
    import string
    from pathlib import Path

    import torch
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["a", "the", "red", "blue", "green", "dog", "man", "on", "of", "grass", "circle",
             "square", "triangle", "star", "running", "##s", "##ing"]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
                               + ["##" + c for c in chars] + words))
    BertWordPieceTokenizer(vocab={w: i for i, w in enumerate(vocab)}, lowercase=True).save(
        str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 128}))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """``write_tiny_bert`` once per session: the folder a config's model.text_model names."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")


@pytest.fixture(scope="session")
def real_text_model():
    """The real all-MiniLM-L6-v2 folder (``STBIR_TEXT_MODEL``, or ~/.cache/stbir/all-MiniLM-L6-v2
    where ``../shared/data/get-text-model.sh`` puts it); the test skips on a machine without it."""
    import os
    from pathlib import Path

    for candidate in (os.environ.get("STBIR_TEXT_MODEL"),
                      Path.home() / ".cache" / "stbir" / "all-MiniLM-L6-v2"):
        if candidate and (Path(candidate) / "model.safetensors").is_file():
            return Path(candidate)
    pytest.skip("all-MiniLM-L6-v2 is not on this machine (../shared/data/get-text-model.sh "
                "~/.cache/stbir/all-MiniLM-L6-v2, or set STBIR_TEXT_MODEL)")

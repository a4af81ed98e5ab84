"""stbir_infer's torch-free tokenizer and preprocessing against open_clip / torchvision."""

from __future__ import annotations

import gzip
import random
import string
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stbir_infer import preprocess as P
from stbir_infer.errors import TokenizerError
from stbir_infer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    import models

    if "stbir-small" not in open_clip.list_models():
        open_clip.add_model_config(Path(models.__file__).parent / "configs")
    return open_clip.get_tokenizer("stbir-small")


@pytest.fixture(scope="module")
def runtime_tokenizer(open_clip_tokenizer):
    from open_clip.tokenizer import default_bpe

    return Tokenizer(default_bpe(), context_length=open_clip_tokenizer.context_length)


WORDS = ["a", "red", "star", "made", "of", "wood", "striped", "blue", "circle", "square", "sketch",
         "photo", "of", "the", "cat", "dog", "triangle", "emerald", "crimson", "golden", "checkered",
         "dotted", "plain", "heart", "arrow", "crescent", "supercalifragilisticexpialidocious",
         "antidisestablishmentarianism", "x", "y", "z"]
ODD = ["caf\u00e9", "na\u00efve", "r\u00e9sum\u00e9", "e\u0301", "\u00c5ngstr\u00f6m", "stra\u00dfe",
       "\u6f22\u5b57", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\ud55c\uad6d\uc5b4",
       "\u0645\u0631\u062d\u0628\u0627", "\u043f\u0440\u0438\u0432\u0435\u0442", "\u03b1\u03b2\u03b3",
       "\U0001F600", "\U0001F44D\U0001F3FD", "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\u2764\ufe0f",
       "\uff21\uff22\uff23", "\ufb01ne", "\u00bd", "\u2460", "\u01c4", "caf\u00c3\u00a9", "\u00e2\u20ac\u2122",
       "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&amp;amp;", "&nbsp;", "&quot;hi&quot;", "&#x1F600;",
       "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "&lt;end_of_text&gt;",
       "it's", "DON'T", "we'll've", "I'M", "they'd", "o'clock", "3.14", "1,000,000", "42x", "0x1F",
       "#hashtag", "@user", "http://example.com/a?b=c&d=e", "e-mail", "C++", "..." , "?!?!", "---",
       "\u2014", "\u201cquoted\u201d", "\u00ab\u00bb", "\x00", "\x1b[31m", "\u200b", "\u00a0", "\u3000",
       "\t", "\n", "\r\n", "   "]
SEPARATORS = [" ", "  ", "", "\t", "\n", ", ", " - ", "\u00a0"]


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a", "A", "!!!", "a red circle", " ".join(["long"] * 100), "x" * 500]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.1:  # overlong
            parts = [rng.choice(WORDS + ODD) for _ in range(rng.randint(30, 120))]
        elif kind < 0.2:  # random printable characters
            parts = ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 60)))]
        elif kind < 0.3:  # random code points from a few blocks
            blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
                      (0x3040, 0x30FF), (0x1F300, 0x1F64F), (0x2000, 0x206F)]
            parts = []
            for _ in range(rng.randint(1, 20)):
                lo, hi = rng.choice(blocks)
                parts.append(chr(rng.randint(lo, hi)))
        else:
            parts = [rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(ODD)
                     for _ in range(rng.randint(1, 12))]
            if rng.random() < 0.3:
                parts = [p.upper() if rng.random() < 0.5 else p.title() for p in parts]
            if rng.random() < 0.3:
                parts.append(rng.choice(string.punctuation) * rng.randint(1, 4))
        text = ""
        for p in parts:
            text += p + rng.choice(SEPARATORS)
        out.append(text)
    return out


def test_tokenizer_matches_open_clip_on_varied_strings(open_clip_tokenizer, runtime_tokenizer):
    texts = varied_strings(1200)
    assert len(set(texts)) >= 1000
    want = open_clip_tokenizer(texts).numpy()
    got = runtime_tokenizer(texts)
    assert got.dtype == np.int64 and got.shape == want.shape == (len(texts), 32)
    mismatches = [t for t, a, b in zip(texts, got, want) if not np.array_equal(a, b)]
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]!r}"
    # Some rows were truncated, some padded: both paths are exercised.
    assert (want[:, -1] == open_clip_tokenizer.eot_token_id).sum() > 50
    assert (want[:, -1] == 0).sum() > 500
    # And at CLIP's usual 77 tokens.
    sub = texts[::4]
    assert np.array_equal(runtime_tokenizer(sub, context_length=77),
                          open_clip_tokenizer(sub, context_length=77).numpy())


def test_tokenizer_truncation_keeps_eot(runtime_tokenizer):
    ids = runtime_tokenizer(["word " * 200, "a red star"])
    sot, eot = runtime_tokenizer.sot_token_id, runtime_tokenizer.eot_token_id
    assert ids[0, 0] == sot and ids[0, -1] == eot and (ids[0] != 0).all()
    assert list(ids[1, :5]) == [sot, *runtime_tokenizer.encode("a red star"), eot][:5]
    assert (ids[1, 5:] == 0).all() and ids[1].argmax() == 4
    assert runtime_tokenizer.decode(runtime_tokenizer.encode("A Red  Star!")).strip() == "a red star !"


def test_tokenizer_from_export_settings(tmp_path, open_clip_tokenizer):
    from open_clip.tokenizer import default_bpe

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "bpe.txt.gz").write_bytes(Path(default_bpe()).read_bytes())
    cfg = {"type": "clip_bpe", "bpe_file": "tokenizer/bpe.txt.gz", "context_length": 32,
           "sot_token_id": 49406, "eot_token_id": 49407, "vocab_size": 49408, "clean": "lower",
           "pad_token_id": 0, "truncation": "keep_first_then_eot", "eot_position": "argmax"}
    tok = Tokenizer.from_export(tmp_path, cfg)
    texts = varied_strings(100, seed=1)
    assert np.array_equal(tok(texts), open_clip_tokenizer(texts).numpy())
    for bad in ({"type": "hf"}, {"clean": "nope"}, {"eot_token_id": 7}, {"reduction_mask": "random"},
                {"truncation": "middle"}, {"bpe_file": "missing.gz"}):
        with pytest.raises(TokenizerError):
            Tokenizer.from_export(tmp_path, {**cfg, **bad})
    (tmp_path / "tokenizer" / "broken.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerError):
        Tokenizer.from_export(tmp_path, {**cfg, "bpe_file": "tokenizer/broken.gz"})
    (tmp_path / "tokenizer" / "short.gz").write_bytes(gzip.compress(b"#version\na b c\n"))
    with pytest.raises(TokenizerError):
        Tokenizer.from_export(tmp_path, {**cfg, "bpe_file": "tokenizer/short.gz"})


# -- preprocessing ------------------------------------------------------------------------------------

IMAGE_SPEC = {"size": 64, "channels": 3, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
              "resize_mode": "shortest"}
SKETCH_SPEC = {"size": 64, "channels": 1, "mean": [0.5], "std": [0.5], "interpolation": "bicubic",
               "resize_mode": "shortest"}


def _test_images() -> list[Image.Image]:
    """Photos and sketches of several sizes and aspect ratios (down- and up-scaling)."""
    from stbir_train.synth import render_photo, render_sketch, sample_item

    rng = np.random.default_rng(5)
    out = []
    for i, size in enumerate((96, 64, 37, 150)):
        item = sample_item(rng, f"p{i}")
        out.append(render_photo(item, rng, size=size))
        out.append(render_sketch(item, rng, size=size).convert("RGB"))
    out.append(out[0].resize((120, 70)))
    out.append(out[0].resize((50, 131)))
    out.append(Image.fromarray(rng.integers(0, 256, (81, 99, 3), dtype=np.uint8)))
    return out


def _cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def torch_model(small_checkpoint):
    from models import load_model

    model, _ = load_model(small_checkpoint)
    return model


def test_preprocessing_matches_open_clip_and_torchvision(torch_model):
    """The runtime's PIL/numpy pipeline against open_clip's own torchvision preprocess (image
    tower) and the equivalent torchvision pipeline (sketch tower): same pixels, same embeddings."""
    import open_clip
    import torch
    from torchvision import transforms as T

    specs = torch_model.input_specs()
    assert specs["image"] == IMAGE_SPEC and specs["sketch"] == SKETCH_SPEC
    image_tf = open_clip.image_transform(64, is_train=False, mean=IMAGE_SPEC["mean"],
                                         std=IMAGE_SPEC["std"], interpolation="bicubic",
                                         resize_mode="shortest")
    sketch_tf = T.Compose([T.Grayscale(), T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5], [0.5])])
    images = _test_images()
    ours_img = np.stack([P.load(im, IMAGE_SPEC) for im in images])
    ref_img = torch.stack([image_tf(im) for im in images])
    ours_sk = np.stack([P.load(im, SKETCH_SPEC) for im in images])
    ref_sk = torch.stack([sketch_tf(im) for im in images])
    assert ours_img.dtype == np.float32 and ours_img.shape == (len(images), 3, 64, 64)
    assert ours_sk.shape == (len(images), 1, 64, 64)
    assert np.abs(ours_img - ref_img.numpy()).max() < 1e-4
    assert np.abs(ours_sk - ref_sk.numpy()).max() < 1e-4
    with torch.no_grad():
        e_ours = torch_model.encode_image(torch.from_numpy(ours_img)).numpy()
        e_ref = torch_model.encode_image(ref_img).numpy()
        s_ours = torch_model.encode_sketch(torch.from_numpy(ours_sk)).numpy()
        s_ref = torch_model.encode_sketch(ref_sk).numpy()
    assert _cos(e_ours, e_ref).min() >= 0.9999
    assert _cos(s_ours, s_ref).min() >= 0.9999


def _roundtrip(img: Image.Image, fmt: str = "PNG", **kw) -> Image.Image:
    buf = BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def test_preprocessing_exif_orientation():
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    # Orientation 6: the stored pixels must be rotated 90 degrees clockwise to display upright.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _roundtrip(stored, exif=exif.tobytes())
    assert tagged.size == (40, 70)
    opened = P.open_image(tagged, 3)
    assert opened.size == upright.size
    assert np.array_equal(np.asarray(opened), np.asarray(upright))
    assert np.array_equal(P.load(tagged, IMAGE_SPEC), P.load(upright, IMAGE_SPEC))


def test_preprocessing_alpha_palette_and_16_bit():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    # RGBA: transparent pixels become white, opaque ones keep their colour.
    alpha = np.zeros((50, 60), np.uint8)
    alpha[:, :30] = 255
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    flat = np.asarray(P.open_image(_roundtrip(rgba), 3))
    assert np.array_equal(flat[:, :30], rgb[:, :30]) and (flat[:, 30:] == 255).all()
    # A sketch drawn black on a transparent canvas reads as black on white.
    ink = np.zeros((50, 60, 4), np.uint8)
    ink[20:30, 10:50, 3] = 255
    sk = np.asarray(P.open_image(_roundtrip(Image.fromarray(ink, "RGBA")), 1))
    assert sk.shape == (50, 60) and (sk[20:30, 10:50] == 0).all() and (sk[:20] == 255).all()
    # LA (gray + alpha) likewise.
    la = Image.fromarray(np.dstack([np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert (np.asarray(P.open_image(_roundtrip(la), 1)) == 255).all()
    # Palette image: same pixels as its RGB rendering, with or without a transparent index.
    pal = Image.fromarray(rgb).quantize(16)
    assert np.array_equal(np.asarray(P.open_image(_roundtrip(pal), 3)),
                          np.asarray(pal.convert("RGB")))
    pal_t = _roundtrip(pal, transparency=0)
    out = np.asarray(P.open_image(pal_t, 3))
    idx = np.asarray(pal)
    assert (out[idx == 0] == 255).all()
    assert np.array_equal(out[idx != 0], np.asarray(pal.convert("RGB"))[idx != 0])
    # 16-bit grayscale scales to 8 bits like the 8-bit original.
    gray8 = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    loaded16 = _roundtrip(gray16)
    assert loaded16.mode.startswith("I")
    assert np.abs(np.asarray(P.open_image(loaded16, 1), np.int16) - gray8).max() <= 1
    assert np.abs(P.load(loaded16, SKETCH_SPEC) - P.load(Image.fromarray(gray8), SKETCH_SPEC)).max() < 0.02
    # Grayscale photo into the 3-channel tower: three equal channels.
    g3 = P.load(Image.fromarray(gray8), {**IMAGE_SPEC, "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert np.array_equal(g3[0], g3[1]) and np.array_equal(g3[1], g3[2])


def test_preprocessing_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(_png_bytes()[:60])
    for name in ("notes.txt", "broken.png", "missing.png"):
        with pytest.raises(P.ImageDecodeError):
            P.load(tmp_path / name, IMAGE_SPEC)


def _png_bytes() -> bytes:
    buf = BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()

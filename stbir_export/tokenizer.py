"""Tokenizer assets and settings for the torch-free runtime.

The runtime must reproduce open_clip's token ids exactly, so the export copies the BPE merges file
the model's tokenizer reads, records every setting that changes the ids, and proves the copy plus
settings rebuild a tokenizer that agrees with the model's own on awkward strings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stbir_export.errors import ExportError

BPE_FILE = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
# Strings that exercise cleaning (html entities, case, whitespace, unicode) and truncation.
PROBES = [
    "a red circle", "", "A BLUE Square  made of\twood!", "caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e",
    "\u201cquoted\u201d text, with   spaces\n", "numbers 3.14 and 42x",
    " ".join(["long"] * 100), "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 emoji \U0001F600",
]


def _clean_name(tok) -> str:
    from open_clip import tokenizer as t

    for name in ("lower", "whitespace", "canonicalize"):
        if tok.clean_fn is t.get_clean_fn(name):
            return name
    raise ExportError(f"the tokenizer's text cleaning ({tok.clean_fn!r}) is not one the runtime knows")


def write_tokenizer(model, out_dir: Path) -> dict:
    """Write the tokenizer's file into ``out_dir``; return the export.json ``tokenizer`` entry."""
    if model.hf_text:
        return write_hf_tokenizer(model, out_dir)
    import open_clip
    from open_clip import tokenizer as t

    tok = model.tokenizer()
    if not isinstance(tok, t.SimpleTokenizer):
        raise ExportError(f"{model.spec.clip_model} uses {type(tok).__name__}; the runtime only "
                          "implements open_clip's CLIP BPE tokenizer")
    if tok.reduction_fn is not None:
        raise ExportError("the tokenizer uses a reduction mask; the runtime only truncates")
    if sorted(tok.all_special_ids) != sorted([tok.sot_token_id, tok.eot_token_id]):
        raise ExportError("the tokenizer has extra special tokens; the runtime does not support them")
    kwargs = (open_clip.get_model_config(model.spec.clip_model) or {}).get("text_cfg", {})
    src = Path(kwargs.get("tokenizer_kwargs", {}).get("bpe_path") or t.default_bpe())
    dst = out_dir / BPE_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)

    settings = {
        "type": "clip_bpe",
        "bpe_file": BPE_FILE,
        "context_length": int(model.context_length),
        "vocab_size": int(tok.vocab_size),
        "sot_token_id": int(tok.sot_token_id),
        "eot_token_id": int(tok.eot_token_id),
        "pad_token_id": 0,
        "clean": _clean_name(tok),
        # [sot] + bpe(text) + [eot]; longer rows keep the first context_length ids and end in eot.
        "truncation": "keep_first_then_eot",
        # The text graph's eot_position input: the index of eot_token_id (its highest id).
        "eot_position": "argmax",
    }
    if tok.context_length != model.context_length:
        raise ExportError(f"tokenizer context length {tok.context_length} differs from the "
                          f"model's {model.context_length}")
    rebuilt = t.SimpleTokenizer(bpe_path=str(dst), context_length=settings["context_length"],
                                clean=settings["clean"])
    if not bool((rebuilt(PROBES) == tok(PROBES)).all()):
        raise ExportError("the exported tokenizer settings do not reproduce the model's token ids")
    return settings


def write_hf_tokenizer(model, out_dir: Path) -> dict:
    """A Hugging Face tower's tokenizer.json (from the checkpoint) and its settings; the file
    and settings rebuilt as the runtime will must give the model's own ids."""
    from stbir_infer.hf_tokenizer import TOKENIZER_FILE, TOKENIZER_TYPE, HFTokenizer

    tok = model.tokenizer().inner
    dst = out_dir / TOKENIZER_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(model.text_files["tokenizer.json"], encoding="utf-8")
    settings = {"type": TOKENIZER_TYPE, "file": TOKENIZER_FILE,
                "context_length": int(tok.context_length), "vocab_size": int(tok.vocab_size),
                "pad_token_id": int(tok.pad_token_id), "clean": tok.clean}
    rebuilt = HFTokenizer.from_export(settings, lambda rel: (out_dir / rel).read_bytes())
    if not bool((rebuilt(PROBES) == tok(PROBES)).all()):
        raise ExportError("the exported tokenizer.json does not reproduce the model's token ids")
    return settings

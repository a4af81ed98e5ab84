"""A Hugging Face text tower's tokenizer, torch-free: ``tokenizer.json`` through ``tokenizers``.

The same file and the same steps serve training (``models.hf_text``) and the runtime, so the ids
a query gets are the ids the model was trained on: open_clip's ``HFTokenizer`` cleaning (ftfy,
HTML unescape, whitespace collapse; ``stbir_infer.tokenizer.CLEAN_FNS``), then the tokenizer's
own normaliser, pre-tokeniser, WordPiece and ``[CLS] ... [SEP]`` template, truncated to
``context_length`` (the template's last token kept) and padded with ``pad_token_id``. A test
checks the ids against ``transformers``' own tokenizer on over a thousand strings.

Text longer than ``MAX_CHARS`` is cut before tokenising: the ids past ``context_length`` are
dropped anyway, and a megabyte of text must not cost a megabyte of WordPiece work.
"""

from __future__ import annotations

import json

import numpy as np

from stbir_infer.errors import TokenizerError
from stbir_infer.tokenizer import CLEAN_FNS

TOKENIZER_TYPE = "hf_tokenizers"
TOKENIZER_FILE = "tokenizer/tokenizer.json"
MAX_CHARS = 4096  # far past any context length a sentence encoder takes (512 tokens)


class HFTokenizer:
    """Text -> int64 ids [B, context_length], padded with ``pad_token_id``."""

    kind = TOKENIZER_TYPE

    def __init__(self, tokenizer_json: str | bytes, *, context_length: int, clean: str = "whitespace",
                 pad_token_id: int = 0, label: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - a base dependency
            raise TokenizerError("this export's text tower needs the `tokenizers` package "
                                 "(pip install tokenizers)") from None
        if clean not in CLEAN_FNS:
            raise TokenizerError(f"tokenizer clean {clean!r} is not one of {', '.join(CLEAN_FNS)}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) \
                or not 2 <= context_length <= 4096:
            raise TokenizerError(f"tokenizer context_length {context_length!r} is not in 2..4096")
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        try:
            json.loads(text)  # a clear error for a file that is not JSON at all
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise TokenizerError(f"{label}: not a Hugging Face tokenizer file "
                                 f"({' '.join(str(exc).split())[:160]})") from None
        tok.no_padding()
        tok.enable_truncation(max_length=context_length)
        self._tok = tok
        self.context_length = context_length
        self.clean = clean
        self._clean_fn = CLEAN_FNS[clean]
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise TokenizerError(f"{label}: pad_token_id {pad_token_id} is outside its "
                                 f"{self.vocab_size} ids")

    @classmethod
    def from_export(cls, cfg: dict, read) -> HFTokenizer:
        """From export.json's ``tokenizer`` entry; ``read(name)`` returns verified bytes."""
        rel = cfg.get("file", TOKENIZER_FILE)
        tok = cls(read(rel), context_length=cfg.get("context_length"),  # type: ignore[arg-type] # __init__ checks it
                  clean=cfg.get("clean", "whitespace"), pad_token_id=cfg.get("pad_token_id", 0),
                  label=rel)
        if cfg.get("vocab_size") is not None and int(cfg["vocab_size"]) != tok.vocab_size:
            raise TokenizerError(f"export.json tokenizer vocab_size is {cfg['vocab_size']} but "
                                 f"{rel} has {tok.vocab_size} ids")
        return tok

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"text must be a string, not {type(text).__name__}")
        cleaned = [self._clean_fn(t[:MAX_CHARS]) for t in texts]
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int64)
        for i, enc in enumerate(self._tok.encode_batch(cleaned)):
            out[i, :len(enc.ids)] = enc.ids
        return out

    def attention_mask(self, ids: np.ndarray) -> np.ndarray:
        """1 where a real token is, 0 on padding (what open_clip's HF text tower masks by)."""
        return (ids != self.pad_token_id).astype(np.int64)


__all__ = ["HFTokenizer", "MAX_CHARS", "TOKENIZER_FILE", "TOKENIZER_TYPE"]

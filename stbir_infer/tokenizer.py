"""open_clip's CLIP BPE tokenizer, without torch: the same ids from the assets in the export dir.

This follows ``open_clip.tokenizer.SimpleTokenizer`` step for step (ftfy + double HTML unescape,
whitespace clean, lower case, the same split regex, byte-level BPE over the same merges, SOT/EOT,
zero padding, truncation that keeps EOT last), so ``Tokenizer(...)(texts)`` equals
``open_clip.get_tokenizer(model)(texts).numpy()`` for the exported model.
"""

from __future__ import annotations

import gzip
import html
import string
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex as re

from stbir_infer.errors import TokenizerError

SOT, EOT = "<start_of_text>", "<end_of_text>"
DEFAULT_BPE_FILE = "tokenizer/bpe_simple_vocab_16e6.txt.gz"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters (as in GPT-2/CLIP)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def basic_clean(text: str) -> str:
    # ftfy and HTML unescaping leave printable ASCII without '&' as it is; skipping them is
    # most of a short query's tokenizing time (issue 18).
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


_PUNCT = str.maketrans("", "", string.punctuation)


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(_PUNCT).lower()
    return " ".join(text.split()).strip()


CLEAN_FNS = {
    "lower": lambda t: whitespace_clean(basic_clean(t)).lower(),
    "whitespace": lambda t: whitespace_clean(basic_clean(t)),
    "canonicalize": lambda t: _canonicalize(basic_clean(t)),
}


class Tokenizer:
    """Text -> int64 token ids [B, context_length], exactly as open_clip's SimpleTokenizer.

    ``bpe_path`` is the gzipped merges file (``bpe_simple_vocab_16e6.txt.gz``), or its bytes.
    """

    def __init__(self, bpe_path: str | Path | bytes, *, context_length: int = 77, clean: str = "lower",
                 additional_special_tokens: list[str] | None = None, num_merges: int | None = None,
                 cache_size: int = 65536):
        if clean not in CLEAN_FNS:
            raise TokenizerError(f"tokenizer clean {clean!r} is not one of {', '.join(CLEAN_FNS)}")
        if not context_length or int(context_length) < 2:
            raise TokenizerError(f"tokenizer context_length {context_length!r} is not valid")
        label = "BPE merges" if isinstance(bpe_path, (bytes, bytearray)) else str(bpe_path)
        try:
            if isinstance(bpe_path, (bytes, bytearray)):
                raw = gzip.decompress(bytes(bpe_path))
            else:
                with gzip.open(bpe_path) as f:
                    raw = f.read()
            lines = raw.decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            raise TokenizerError(f"{label}: not a readable BPE merges file ({exc})") from None
        # open_clip keeps merges[1 : 49152 - 256 - 2 + 1] (line 0 is a version header).
        end = 49152 - 256 - 2 + 1 if num_merges is None else 1 + int(num_merges)
        merges = [tuple(m.split()) for m in lines[1:end]]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{label}: malformed merge lines")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        special = [SOT, EOT] + list(additional_special_tokens or [])
        vocab.extend(special)
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.special_tokens = special
        self.pat = re.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.context_length = int(context_length)
        self.clean = clean
        self._clean_fn = CLEAN_FNS[clean]
        self._bpe_cached = lru_cache(maxsize=cache_size)(self._bpe)

    @classmethod
    def from_export(cls, export_dir: str | Path, cfg: dict,
                    read: Callable[[str], bytes] | None = None) -> Tokenizer:
        """Build from the ``tokenizer`` section of export.json (paths relative to the export dir).

        ``read(name)``, when given, returns the file's bytes after verifying them (``Encoders``
        passes its sha256-checked reader); the merges are then parsed from those bytes."""
        kind = cfg.get("type", "clip_bpe")
        if kind != "clip_bpe":
            raise TokenizerError(f"tokenizer type {kind!r} is not supported (only clip_bpe)")
        if cfg.get("reduction_mask"):
            raise TokenizerError(f"tokenizer reduction_mask {cfg['reduction_mask']!r} is not supported")
        for key, supported in (("truncation", "keep_first_then_eot"), ("eot_position", "argmax"),
                               ("pad_token_id", 0)):
            if cfg.get(key, supported) != supported:
                raise TokenizerError(f"tokenizer {key} {cfg[key]!r} is not supported "
                                     f"(this runtime does {supported!r})")
        rel = cfg.get("bpe_file", DEFAULT_BPE_FILE)
        bpe = Path(export_dir) / rel
        if not bpe.is_file():
            raise TokenizerError(f"{bpe}: tokenizer merges file missing from the export dir")
        tok = cls(bpe if read is None else read(rel),
                  context_length=cfg.get("context_length") or 77, clean=cfg.get("clean", "lower"),
                  additional_special_tokens=cfg.get("additional_special_tokens"),
                  num_merges=cfg.get("num_merges"))
        for key, have in (("sot_token_id", tok.sot_token_id), ("eot_token_id", tok.eot_token_id),
                          ("vocab_size", tok.vocab_size)):
            if key in cfg and cfg[key] is not None and int(cfg[key]) != have:
                raise TokenizerError(f"export.json tokenizer {key} is {cfg[key]} but the merges "
                                     f"file gives {have}")
        return tok

    # -- BPE ----------------------------------------------------------------------------------------
    def _bpe(self, token: str) -> str:
        if token in self.special_tokens:
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT and without truncation."""
        ids: list[int] = []
        for token in self.pat.findall(self._clean_fn(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe_cached(token).split(" "))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return (bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
                .replace("</w>", " "))

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """int64 [B, L]: SOT, tokens, EOT, zero padding; overlong rows are cut and end in EOT."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"text must be a string, not {type(text).__name__}")
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = ids
        return out


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))

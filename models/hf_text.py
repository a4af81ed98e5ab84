"""A pretrained Hugging Face sentence encoder as the text tower (``model.text_model: DIR``).

open_clip builds it (``CustomTextCLIP`` with an ``hf_model_name`` text config: the BERT from
``transformers``, mean pooling over real tokens, a linear or MLP projection); this module checks
the folder first, so a wrong one is one line, and keeps the folder's small files
(``config.json``, ``tokenizer.json``) so that a checkpoint carries them: export and evaluation
need no copy of the folder, and the weights travel in the checkpoint's state dict.

Only what the export and the runtime handle is accepted: a BERT-family encoder (word, position
and token-type embeddings; the exported graph takes the looked-up word rows plus the attention
mask) with safetensors weights (a pickled ``pytorch_model.bin`` could run code) and a
``tokenizer.json`` whose vocabulary is the model's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ModelError
from models.scoped import quiet_logs
from stbir_infer.errors import TokenizerError
from stbir_infer.hf_tokenizer import HFTokenizer

MODEL_TYPES = ("bert",)  # what the exported text graph (inputs_embeds + attention mask) is checked on
KEPT_FILES = ("config.json", "tokenizer.json")  # what a checkpoint carries besides the weights
WEIGHTS = "model.safetensors"
MAX_FILE_BYTES = 64 << 20  # config and tokenizer files are kilobytes to a few megabytes
PROJECTIONS = ("linear", "mlp")


def read_text_model(path: str | Path, *, weights: bool = True) -> dict[str, str]:
    """The kept files of a local Hugging Face model folder, checked (``check_files``); with
    ``weights`` its ``model.safetensors`` must be there too. ModelError names what is wrong."""
    folder = Path(path).expanduser()
    what = f"text_model {path}"
    if not folder.is_dir():
        raise ModelError(f"{what}: not a folder (a local Hugging Face model: config.json, "
                         f"{WEIGHTS}, tokenizer.json)")
    files = {}
    for name in KEPT_FILES:
        file = folder / name
        if not file.is_file():
            raise ModelError(f"{what}: {name} is missing")
        if file.stat().st_size > MAX_FILE_BYTES:
            raise ModelError(f"{what}: {name} is over {MAX_FILE_BYTES >> 20} MB")
        try:
            files[name] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{what}: {name} is not readable UTF-8 text ({exc})") from None
    if weights and not (folder / WEIGHTS).is_file():
        raise ModelError(f"{what}: {WEIGHTS} is missing (only safetensors weights are read: "
                         "a pickled pytorch_model.bin could run code)")
    check_files(files, what)
    return files


def check_files(files: dict[str, str], what: str, context_length: int = 64) -> dict:
    """The parsed config.json, after checking the model family and that tokenizer.json's
    vocabulary is the model's word-embedding table."""
    if not isinstance(files, dict) or any(not isinstance(files.get(n), str) for n in KEPT_FILES):
        raise ModelError(f"{what}: the text model's {' and '.join(KEPT_FILES)} are missing")
    try:
        config = json.loads(files["config.json"])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{what}: config.json is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{what}: config.json is not a JSON object")
    if config.get("model_type") not in MODEL_TYPES:
        raise ModelError(f"{what}: config.json's model_type is {config.get('model_type')!r}; the "
                         f"text tower takes a BERT-family encoder ({', '.join(MODEL_TYPES)})")
    vocab = config.get("vocab_size")
    try:
        tok = HFTokenizer(files["tokenizer.json"], context_length=context_length,
                          pad_token_id=config.get("pad_token_id", 0), label="tokenizer.json")
    except TokenizerError as exc:
        raise ModelError(f"{what}: {exc}") from None
    if tok.vocab_size != vocab:
        raise ModelError(f"{what}: tokenizer.json has {tok.vocab_size} ids but config.json's "
                         f"vocab_size is {vocab}: the tokenizer does not match the model")
    return config


def build_clip(arch: dict, files: dict[str, str], *, weights_dir: str | None, proj: str,
               context_length: int):
    """open_clip's CustomTextCLIP: ``arch``'s image tower (an open_clip model config: embed_dim,
    vision_cfg) and the HF text tower of ``files``; its weights from ``weights_dir`` when given
    (a fresh model), else random (a checkpoint's state dict comes next). ``files`` are checked
    already (``read_text_model`` or ``check_files``)."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    if proj not in PROJECTIONS:
        raise ModelError(f"text_proj must be one of {', '.join(PROJECTIONS)}, got {proj!r}")
    with tempfile.TemporaryDirectory(prefix="stbir-text-") as tmp:
        source = weights_dir
        if source is None:  # open_clip reads the architecture from a folder's config.json
            source = tmp
            (Path(tmp) / "config.json").write_text(files["config.json"], encoding="utf-8")
        text_cfg = dict(hf_model_name=str(source), hf_tokenizer_name=str(source),
                        hf_pooler_type="mean_pooler", hf_proj_type=proj,
                        hf_model_pretrained=weights_dir is not None, context_length=context_length)
        try:  # transformers says the unused pooler weights "were not used": expected, quiet
            with quiet_logs("transformers"):
                clip = open_clip.CustomTextCLIP(embed_dim=arch["embed_dim"],
                                                vision_cfg=arch["vision_cfg"], text_cfg=text_cfg)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"text_model {weights_dir or ''}: transformers could not build it "
                             f"({' '.join(str(exc).split())[:200]})") from None
    preprocess = asdict(PreprocessCfg())  # open_clip's defaults, as create_model starts from
    preprocess["size"] = clip.visual.image_size
    set_model_preprocess_cfg(clip, preprocess)
    return clip


def lock(text: nn.Module, unlocked_layers: int) -> None:
    """The embeddings and all but the top ``unlocked_layers`` transformer layers frozen (0: the
    whole transformer; the projection always learns). open_clip's ``lock`` does this for 0; for
    N > 0 it needs a ``layer_attr`` entry its arch table lacks for BERT, so the layers are
    frozen here by name (``encoder.layer``, BERT's)."""
    if unlocked_layers == 0:
        text.lock(unlocked_layers=0, freeze_layer_norm=True)
        return
    layers = text.transformer.encoder.layer
    for module in [text.transformer.embeddings, *layers[:max(0, len(layers) - unlocked_layers)]]:
        module.requires_grad_(False)


def encode(text: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's HF tower on padded ids (the mask is ``ids != pad_token_id``), normalised.
    The batch's shared tail of padding is cut first: masked positions change nothing, and a
    short caption then costs its own length instead of the context length."""
    real = (ids != text.config.pad_token_id).sum(1)
    if len(ids) and int(real.max()) < ids.shape[1]:
        ids = ids[:, :max(1, int(real.max()))]
    return F.normalize(text(ids), dim=-1)


def encode_embeddings(text: nn.Module, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exported graph's form: word-embedding rows [B, L, W] (looked up outside) and the
    attention mask [B, L]; position and token-type embeddings, LayerNorm, the layers, mean
    pooling and the projection inside. Equals ``encode`` on the same tokens."""
    out = text.transformer(inputs_embeds=emb, attention_mask=mask)
    return F.normalize(text.proj(text.pooler(out, mask)), dim=-1)


def word_embeddings(text: nn.Module) -> torch.Tensor:
    return text.transformer.get_input_embeddings().weight


def trunk_parameters(text: nn.Module) -> list[nn.Parameter]:
    """The pretrained transformer's parameters (not the projection, which starts fresh)."""
    return list(text.transformer.parameters())


__all__ = ["KEPT_FILES", "MODEL_TYPES", "PROJECTIONS", "build_clip", "check_files", "encode",
           "encode_embeddings", "lock", "read_text_model", "trunk_parameters", "word_embeddings"]

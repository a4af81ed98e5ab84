"""The tri-modal model: a CNN sketch tower plus open_clip image and text towers in one space.

Every encoder returns L2-normalised vectors of ``embed_dim``. ``configure_stage`` picks which
branch learns; the frozen ones are anchors. Query fusion (sketch + text) is a weighted mean of the
two unit vectors, re-normalised, with the weight stored as a buffer so it travels with the
checkpoint and into the export; with ``spec.combiner`` also a learned Combiner (models/combiner.py,
issue 16), which validation makes the default only where it measures better (stbir_train.fusion).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import hf_text
from models.causal_text import run_blocks
from models.combiner import Combiner
from models.errors import ModelError
from models.scoped import open_clip_scope
from models.spec import TRUNK_IMAGE_NORM, ModelSpec
from models.towers import ArcFaceHead, SketchEncoder
from models.weights import load_clip_weights
from stbir_infer.contract import BRANCHES, QUERY_NEEDS_INPUT
from stbir_infer.hf_tokenizer import HFTokenizer

STAGE_TARGETS = BRANCHES + ("all", "combiner")  # combiner: only the learned fusion learns
_CONFIG_DIR = Path(__file__).parent / "configs"


def _open_clip():
    # The first import happens offline (huggingface_hub reads HF_HUB_OFFLINE when imported);
    # open_clip_scope puts the caller's environment back afterwards.
    with open_clip_scope():
        import open_clip

    if "stbir-small" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


def weighted_mean(sketch: torch.Tensor | None, text: torch.Tensor | None, weight: float | torch.Tensor):
    """Sketch+text query vector: weighted mean of the unit vectors, re-normalised.

    Either half may be missing; then the other is the query.
    """
    if sketch is None and text is None:
        raise ValueError(QUERY_NEEDS_INPUT)
    if sketch is None:
        return text
    if text is None:
        return sketch
    return F.normalize(weight * sketch + (1 - weight) * text, dim=-1)


class STBIRModel(nn.Module):
    def __init__(self, spec: ModelSpec, text_files: dict[str, str] | None = None):
        """``text_files``: a checkpoint's copy of the HF text model's files (``spec.text_model``
        is then not read: the weights come from the checkpoint)."""
        super().__init__()
        self.spec = spec
        open_clip = _open_clip()
        if spec.clip_model not in open_clip.list_models():
            raise ModelError(f"clip_model {spec.clip_model!r} is not an open_clip architecture")
        self.text_files = None
        with open_clip_scope():  # it warns that random init has no weights: they come next
            if spec.text_model:
                self.clip = self._build_hf_clip(open_clip, text_files)
            else:
                if (spec.image_size, spec.image_proj) != (None, None):
                    raise ModelError("model.image_size / image_proj are for a text_model preset; "
                                     "other architectures take them from their open_clip config")
                self.clip = open_clip.create_model(spec.clip_model, pretrained=None,
                                                   force_quick_gelu=spec.quick_gelu)
        if spec.pretrained:
            _load_clip_weights(self.clip, spec.clip_model, spec.pretrained,
                               spec.quick_gelu or bool((open_clip.get_model_config(
                                   spec.clip_model) or {}).get("quick_gelu")))
        self.clip.logit_scale.requires_grad_(False)  # training uses the config's temperature
        if self.text_files is not None:
            self.embed_dim = int(self.clip.text.output_dim)
            self.context_length = int(spec.text_context_length)
        else:
            if spec.text_unlocked_layers != -1:
                raise ModelError("model.text_unlocked_layers is for a text_model (HF) text tower")
            self.embed_dim = int(self.clip.text_projection.shape[1])
            self.context_length = int(self.clip.context_length)
        self.sketch = SketchEncoder(spec.sketch_backbone, self.embed_dim, spec.sketch_pretrained)
        # The sketch weight queries fuse with: starts at the training weight, then validation
        # picks it (stbir_train.fusion.select_fusion); export.json carries it as fusion_weight.
        self.register_buffer("query_sketch_weight", torch.tensor(float(spec.train_sketch_weight)))
        self.combiner = (Combiner(self.embed_dim, spec.train_sketch_weight) if spec.combiner else None)
        self.arcface = (ArcFaceHead(self.embed_dim, spec.arcface_classes, spec.arcface_scale,
                                    spec.arcface_margin) if spec.arcface_classes else None)
        self.stage = "all"
        self._input_specs = self._build_input_specs()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the rename call the query weight "fusion_weight".
        old = prefix + "fusion_weight"
        if old in state_dict:
            state_dict[prefix + "query_sketch_weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _build_hf_clip(self, open_clip, text_files: dict[str, str] | None):
        spec = self.spec
        arch = copy.deepcopy(open_clip.get_model_config(spec.clip_model))
        vision = arch["vision_cfg"]
        if spec.image_size is not None:
            vision["image_size"] = int(spec.image_size)
        if spec.image_proj is not None:
            if "timm_model_name" not in vision or spec.image_proj not in hf_text.PROJECTIONS:
                raise ModelError(f"image_proj {spec.image_proj!r}: linear or mlp, for a timm trunk")
            vision["timm_proj"] = spec.image_proj
        if spec.text_context_length < 2:
            raise ModelError(f"text_context_length must be >= 2, got {spec.text_context_length}")
        weights_dir = None
        if text_files is None:  # a fresh model: the folder, checked, and its weights
            text_files = hf_text.read_text_model(spec.text_model)
            weights_dir = str(Path(spec.text_model).expanduser())
        else:  # a checkpoint's copy of the folder's files
            hf_text.check_files(text_files, f"text_model {spec.text_model}")
        self.text_files = dict(text_files)
        return hf_text.build_clip(arch, self.text_files, weights_dir=weights_dir,
                                  proj=spec.text_proj, context_length=spec.text_context_length)

    # -- branches -----------------------------------------------------------------------------
    @property
    def hf_text(self) -> bool:
        """Whether the text tower is a Hugging Face encoder (``spec.text_model``)."""
        return self.text_files is not None

    def branch_modules(self, branch: str) -> list[nn.Module | nn.Parameter]:
        c = self.clip
        text = ([c.text] if self.hf_text else
                [c.token_embedding, c.positional_embedding, c.transformer, c.ln_final,
                 c.text_projection])
        return {"sketch": [self.sketch], "image": [c.visual], "text": text}[branch]

    def _trunk_parameters(self) -> list[nn.Parameter]:
        """Pretrained tower layers that learn at ``trunk_lr_scale`` (not the fresh heads)."""
        out = list(self.sketch.backbone.parameters())
        trunk = getattr(self.clip.visual, "trunk", None)
        out += list(trunk.parameters()) if trunk is not None else []
        return out + (hf_text.trunk_parameters(self.clip.text) if self.hf_text else [])

    def param_groups(self, lr: float) -> list[dict]:
        """The trainable parameters as optimiser groups: the heads and fresh layers at ``lr``
        (first), pretrained layers at ``lr`` x ``trunk_lr_scale``; each group's ``lr_scale``
        says which. One group when the scale is 1 (as checkpoints before the scale have)."""
        learning = [p for p in self.parameters() if p.requires_grad]
        scale = float(self.spec.trunk_lr_scale)
        if scale == 1.0:
            return [{"params": learning, "lr": lr, "lr_scale": 1.0}]
        trunk = {id(p) for p in self._trunk_parameters()}
        groups = [{"params": [p for p in learning if id(p) not in trunk], "lr_scale": 1.0},
                  {"params": [p for p in learning if id(p) in trunk], "lr_scale": scale}]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        return groups

    def branch_parameters(self, branch: str) -> list[nn.Parameter]:
        out = []
        for m in self.branch_modules(branch):
            out.extend([m] if isinstance(m, nn.Parameter) else m.parameters())
        return out

    def configure_stage(self, target: str) -> None:
        """Make only ``target``'s branch trainable (all three for "all"); the ArcFace head always
        trains. Frozen branches also stay in eval mode, so their BatchNorm statistics are kept."""
        if target not in STAGE_TARGETS:
            raise ModelError(f"stage target {target!r} is not one of {', '.join(STAGE_TARGETS)}")
        self.stage = target
        for branch in BRANCHES:
            on = target in (branch, "all")
            for p in self.branch_parameters(branch):
                p.requires_grad_(on)
        if target in ("text", "all") and self.spec.text_unlocked_layers >= 0:
            hf_text.lock(self.clip.text, self.spec.text_unlocked_layers)
        if target in ("image", "all") and self.spec.image_unlocked_layers >= 0:
            with warnings.catch_warnings():  # open_clip imports timm.models.helpers (deprecated)
                warnings.simplefilter("ignore", FutureWarning)
                self.clip.visual.lock(unlocked_groups=self.spec.image_unlocked_layers)
        if self.combiner is not None:  # learns in its own stage and jointly with "all"
            self.combiner.requires_grad_(target in ("combiner", "all"))
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for branch in BRANCHES:
            if self.stage not in (branch, "all"):
                for m in self.branch_modules(branch):
                    if isinstance(m, nn.Module):
                        m.eval()
        if self.combiner is not None and self.stage not in ("combiner", "all"):
            self.combiner.eval()
        if self.spec.image_unlocked_layers >= 0:  # small batches: keep ImageNet's statistics
            for m in self.clip.visual.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if self.hf_text and self.spec.text_unlocked_layers == 0:  # a locked tower: no dropout
            self.clip.text.transformer.eval()
        return self

    # -- encoders ------------------------------------------------------------------------------
    def encode_sketch(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sketch(x), dim=-1)

    def encode_sketch_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the exported sketch graph computes: the unit embedding (``encode_sketch``) and
        the drawing descriptor (``SketchEncoder.with_drawing``), in one pass."""
        emb, drawing = self.sketch.with_drawing(x)
        return F.normalize(emb, dim=-1), drawing

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.hf_text:
            return hf_text.encode(self.clip.text, tokens)
        emb = self.clip.token_embedding(tokens)
        return self.encode_text_embeddings(emb, eot_position(tokens))

    @property
    def token_table(self) -> torch.Tensor:
        """The vocabulary table the export detaches (token_embedding.npy)."""
        return hf_text.word_embeddings(self.clip.text) if self.hf_text else self.clip.token_embedding.weight

    def encode_text_embeddings(self, emb: torch.Tensor, eot: torch.Tensor, *,
                               traceable: bool = False) -> torch.Tensor:
        """Text tower from looked-up token embeddings [B, L, D] and end-of-text positions [B].

        The vocabulary lookup stays outside, and pooling at the end-of-text token is a one-hot
        weighted sum (no Gather on the table). ``traceable``: the exported graph's form
        (``encode_text_graph``): the same attention written so that the graph takes any L up to
        the context length (``models.causal_text``); training keeps open_clip's own blocks.
        """
        c = self.clip
        cast = c.transformer.get_cast_dtype()
        n = emb.shape[1]
        x = emb.to(cast) + c.positional_embedding[:n].to(cast)
        mask = None if c.attn_mask is None else c.attn_mask[:n, :n]
        x = run_blocks(c.transformer, x, mask) if traceable else c.transformer(x, attn_mask=mask)
        x = c.ln_final(x)
        pick = (torch.arange(x.shape[1], device=x.device)[None, :] == eot[:, None]).to(x.dtype)
        x = (x * pick[..., None]).sum(1)
        x = c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection
        return F.normalize(x, dim=-1)

    def encode_text_graph(self, emb: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """What the exported text graph computes (export verifies it against ``encode_text``):
        token rows and the end-of-text positions, or for an HF tower the attention mask."""
        if self.hf_text:
            return hf_text.encode_embeddings(self.clip.text, emb, second)
        return self.encode_text_embeddings(emb, second, traceable=True)

    def fuse_for_training(self, sketch: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        """The training fusion: the Combiner where the model has one, else the weighted mean
        with the configured weight (``spec.train_sketch_weight``, fixed while training)."""
        if self.combiner is not None and sketch is not None and text is not None:
            return self.combiner(sketch, text)
        return weighted_mean(sketch, text, float(self.spec.train_sketch_weight))

    @property
    def default_fusion(self) -> str:
        """"combiner" where the model has a Combiner that validation preferred, else "mean"."""
        return "combiner" if self.combiner is not None and bool(self.combiner.preferred) else "mean"

    def fuse_for_query(self, sketch: torch.Tensor | None, text: torch.Tensor | None,
                   method: str | None = None) -> torch.Tensor:
        """The query-time fusion: ``method`` "combiner" or "mean" (the weighted mean with the
        validation-picked ``query_sketch_weight`` buffer); None = the default, the Combiner only
        where validation preferred it (``combiner.preferred``)."""
        method = method or self.default_fusion
        if method == "combiner" and sketch is not None and text is not None:
            if self.combiner is None:
                raise ModelError("this model has no Combiner")
            return self.combiner(sketch, text)
        return weighted_mean(sketch, text, self.query_sketch_weight)

    # -- what export and the data pipeline need ---------------------------------------------------
    def input_specs(self) -> dict[str, dict]:
        """Preprocessing of each pixel input; the one source for training, export and runtime."""
        return copy.deepcopy(self._input_specs)

    def _build_input_specs(self) -> dict[str, dict]:
        oc = _open_clip()
        cfg = oc.get_model_preprocess_cfg(self.clip)
        size = cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        trunk = ((oc.get_model_config(self.spec.clip_model) or {}).get("vision_cfg") or {}).get(
            "timm_model_name")
        mean, std = TRUNK_IMAGE_NORM.get(trunk, (cfg["mean"], cfg["std"]))
        image = dict(size=int(size), channels=3, mean=[float(v) for v in mean],
                     std=[float(v) for v in std],
                     interpolation=cfg.get("interpolation", "bicubic"),
                     resize_mode=self.spec.image_resize)
        sketch = dict(size=int(self.spec.sketch_size), channels=1, mean=[0.5], std=[0.5],
                      interpolation="bicubic", resize_mode=self.spec.sketch_resize)
        for name, spec in (("image", image), ("sketch", sketch)):
            if spec["resize_mode"] not in ("shortest", "pad"):
                raise ModelError(f"{name}_resize must be shortest or pad, got {spec['resize_mode']!r}")
            if spec["resize_mode"] == "pad":  # fill that normalises to 0: neutral, like conv padding
                spec["pad_fill"] = [255] if name == "sketch" else [round(m * 255) for m in spec["mean"]]
        return {"image": image, "sketch": sketch}

    def tokenizer(self):
        """Texts -> int64 id tensors [B, context_length]: open_clip's, or for an HF tower the
        runtime's own (``stbir_infer.hf_tokenizer``) over the model's tokenizer.json."""
        if self.hf_text:
            config = json.loads(self.text_files["config.json"])
            tok = HFTokenizer(self.text_files["tokenizer.json"], context_length=self.context_length,
                              pad_token_id=config.get("pad_token_id", 0))
            return TorchIds(tok)
        return _open_clip().get_tokenizer(self.spec.clip_model)


class TorchIds:
    """A numpy tokenizer that returns torch tensors (what training and export take)."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, texts) -> torch.Tensor:
        return torch.from_numpy(self.inner(texts))


def eot_position(tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's "argmax" pooling: the end-of-text token has the highest id in each row."""
    return tokens.argmax(dim=-1)


def _load_clip_weights(clip: nn.Module, name: str, pretrained: str, quick_gelu: bool) -> None:
    """``pretrained`` is a local file, or an open_clip tag that must already be in the cache.

    Either way the file is read with ``weights_only=True``: a weights file that needs code to
    unpickle is refused, never run."""
    path = Path(pretrained).expanduser()
    open_clip = _open_clip()
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        load_clip_weights(clip, name, pretrained, quick_gelu)  # formats: models/weights.py
        return
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ModelError(f"pretrained: {pretrained!r} is not an open_clip tag for {name} "
                         f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    try:
        with open_clip_scope():
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            file = open_clip.download_pretrained(cfg)
        _safe_load_checkpoint(open_clip, clip, file)
    except Exception as exc:
        raise ModelError(f"pretrained: weights {name}/{pretrained} are not available offline; "
                         f"pass a local weights file instead ({type(exc).__name__})") from None


def _safe_load_checkpoint(open_clip, clip: nn.Module, file: str) -> None:
    """open_clip's loader (it converts third-party layouts), made to unpickle weights only.

    Versions whose loader has no ``weights_only`` switch get the file read here instead."""
    if "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters:
        open_clip.load_checkpoint(clip, file, weights_only=True)
        return
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(file, device="cpu")
    else:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    clip.load_state_dict(sd)


def build_model(spec: ModelSpec | dict, text_files: dict[str, str] | None = None) -> STBIRModel:
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return STBIRModel(spec, text_files)

"""What a model is, as data: ``ModelSpec`` (stored in every checkpoint) and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Old field name -> new one (a checkpoint's stored spec may use the old name).
RENAMED = {"fusion_weight": "train_sketch_weight"}


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    clip_model: str = "stbir-small"
    pretrained: str | None = None  # null, an open_clip tag, or a local weights file
    sketch_backbone: str = "resnet18"
    sketch_pretrained: str | None = None  # null or a local torchvision state-dict file
    sketch_size: int = 64
    # The sketch vector's weight in the weighted mean that training fuses with (fixed while it
    # trains; the weight queries use is picked on validation: the model's query_sketch_weight).
    train_sketch_weight: float = 0.5
    arcface_classes: int = 0  # set by training from the data; 0 = no head
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    quick_gelu: bool = False  # QuickGELU activations (what OpenAI-format CLIP weights need)
    # How each pixel branch fits an image to its square: "shortest" (centre crop) or "pad"
    # (letterbox: white for sketches, the normalisation mean for photos); docs/real-photos.md, issue 15.
    sketch_resize: str = "shortest"
    image_resize: str = "shortest"
    combiner: bool = False  # a learned query fusion (models/combiner.py) besides the weighted mean
    # A pretrained Hugging Face sentence encoder as the text tower (models/hf_text.py): a local
    # folder; the checkpoint keeps its config and tokenizer, so only training reads the folder.
    text_model: str | None = None
    text_proj: str = "linear"  # its projection into the shared space: linear or mlp
    text_context_length: int = 64  # tokens the HF tower reads ([CLS] + words + [SEP])
    image_size: int | None = None  # with text_model: the image tower's input size (None: preset's)
    image_proj: str | None = None  # with text_model: linear or mlp image head (None: preset's)
    # How the pretrained towers learn when their branch trains: -1 all of it; 0 the projection
    # only (the tower locked, its BatchNorm / dropout in eval mode); N the top N layers (text) or
    # layer groups (image) too. The locked layers' learning rate is trunk_lr_scale x the stage's.
    text_unlocked_layers: int = -1
    image_unlocked_layers: int = -1
    trunk_lr_scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items()}  # checkpoints saved before a rename
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# Presets are data: a named set of ModelSpec fields. "seed" is the seed's size (ViT-B-32 towers,
# resnet50 sketch tower, 512-d); "small" trains on two CPU cores in minutes.
PRESETS: dict[str, dict] = {
    "small": dict(clip_model="stbir-small", sketch_backbone="resnet18", sketch_size=64),
    "seed": dict(clip_model="ViT-B-32", sketch_backbone="resnet50", sketch_size=224),
    # MobileNetV2 in both visual towers (timm's mobilenetv2_100 behind open_clip's image tower,
    # torchvision's for sketches): both can start from ImageNet weights (torchvision format).
    "edge": dict(clip_model="stbir-edge", sketch_backbone="mobilenet_v2", sketch_size=96),
    # A distillation teacher (issue 17): the edge towers at 160 px and a 4-layer 256-wide text
    # tower; 3 epochs from ImageNet weights take about 8 minutes on two cores (docs/distillation.md).
    "medium": dict(clip_model="stbir-medium", sketch_backbone="mobilenet_v2", sketch_size=160),
    # A distillation student (stbir-train distill): the edge preset's MobileNetV2 towers at
    # 48 px (a quarter of the pixels; they take the same ImageNet weights) and one text layer.
    "tiny": dict(clip_model="stbir-tiny", sketch_backbone="mobilenet_v2", sketch_size=48),
    # Real photos with a pretrained sentence encoder (model.text_model; the JSON's own small
    # text tower serves only without one): MobileNetV2 image tower at 160 px, 256-d space.
    "real": dict(clip_model="stbir-real", sketch_backbone="mobilenet_v2", sketch_size=128),
}

# Image normalisation a timm image trunk's pretrained weights expect, where it is not open_clip's
# default (the MobileNetV2 ImageNet weights take inputs in [-1, 1]).
TRUNK_IMAGE_NORM: dict[str, tuple[list[float], list[float]]] = {
    "mobilenetv2_100": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}

"""YAML config -> validated, typed settings.

The schema is the dataclasses below: an unknown key or a value of the wrong type is a
``ConfigError`` that names the key (dotted) and the file. Relative paths resolve against the
config file's folder, so a dataset and its config move together.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from models.model import STAGE_TARGETS
from models.spec import PRESETS, RENAMED, ModelSpec
from stbir_infer.contract import BRANCHES
from stbir_train.distill_spec import DistillSpec
from stbir_train.errors import ConfigError


@dataclass
class NoiseSpec:
    """Corruption of one modality: probability and strength ramp linearly from start to max
    over the first ``ramp_samples`` training samples of a stage (or, when that is null, its
    first ``ramp_epochs`` epochs), then hold."""

    start_prob: float = 0.0
    max_prob: float = 0.5
    start_strength: float = 0.1
    max_strength: float = 0.6
    ramp_epochs: int = 10
    ramp_samples: int | None = None


@dataclass
class StageNoise:
    """Per-stage override of the curriculum: switch it off, or replace some of its numbers."""

    enabled: bool = True
    photo: dict[str, float] = field(default_factory=dict)
    sketch: dict[str, float] = field(default_factory=dict)


@dataclass
class CurriculumSpec:
    enabled: bool = True
    photo: NoiseSpec = field(default_factory=NoiseSpec)
    sketch: NoiseSpec = field(default_factory=NoiseSpec)
    stages: dict[str, StageNoise] = field(default_factory=dict)


@dataclass
class CategorySpec:
    """Where one category's files are, relative to ``data.root``; empty = the seed's layout
    under a folder named after the category."""

    train_sketches: str = ""
    train_images: str = ""
    test_sketches: str = ""
    test_images: str = ""
    train_text: str = ""
    test_text: str = ""


@dataclass
class DataSpec:
    root: str = "."
    categories: dict[str, CategorySpec] = field(default_factory=dict)
    val_fraction: float = 0.1
    negatives_per_modality: int = 2
    virtual_classes: int = 16
    manifest_seed: int = 0
    curriculum_noise: CurriculumSpec = field(default_factory=CurriculumSpec)


@dataclass
class StageSpec:
    """One stage's length is ``samples`` (training items it shows, whatever the data's size;
    rounded up to whole batches) or ``epochs`` (passes over the training set); neither: 1 epoch."""

    target: str = "all"
    epochs: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.05
    samples: int | None = None


@dataclass
class TrainingSpec:
    batch_size: int = 64
    num_workers: int = 1
    grad_clip: float = 1.0
    amp: bool = True  # used only on CUDA
    device: str = "auto"
    seed: int = 0
    stages: list[StageSpec] = field(default_factory=lambda: [StageSpec(t, 4, 5e-4) for t in BRANCHES])
    # Validate every this many training samples (and at the end of each stage); null: once an
    # epoch. best.pt keeps the best validation sketch+text R@1, and a stage that a later stage
    # follows hands it its best weights, not its last ones.
    val_every: int | None = None
    # Early stopping: end a stage after this many validations in a row without a new best of
    # the stage (0: never).
    patience: int = 0
    # A sketch stage computes the frozen image and text towers' vectors of every training item
    # once, instead of every step (the photos are then not corrupted by the curriculum in it).
    cache_anchors: bool = False


@dataclass
class LossWeights:
    infonce: float = 1.0
    triplet: float = 0.5
    fusion: float = 0.1
    arcface: float = 0.1
    infonce_sketch: float = 0.0  # InfoNCE of sketch-only queries (seed 002: missing modalities)
    infonce_text: float = 0.0    # InfoNCE of text-only queries


@dataclass
class LossSpec:
    temperature: float = 0.07
    triplet_margin: float = 0.2
    arcface_labels: str = "category"  # or "virtual_class"
    fusion_items: int = 0  # items per batch in the fusion-consistency loss; 0 = all
    # Probability that an item's fused query is replaced by its sketch-only or its text-only
    # vector (half each) in the fused-query losses, so single modes are trained queries too.
    modality_dropout: float = 0.0
    weights: LossWeights = field(default_factory=LossWeights)


@dataclass
class ModelSection:
    preset: str = "small"
    clip_model: str | None = None
    pretrained: str | None = None
    sketch_backbone: str | None = None
    sketch_pretrained: str | None = None
    sketch_size: int | None = None
    train_sketch_weight: float = 0.5  # the weighted mean training fuses with (was fusion_weight)
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    quick_gelu: bool | None = None  # QuickGELU text/image activations (OpenAI-format weights)
    init_from: str | None = None  # an STBIR checkpoint (e.g. best.pt) to warm-start from
    sketch_resize: str | None = None  # "shortest" (centre crop) or "pad"; null: the preset's
    image_resize: str | None = None
    combiner: bool | None = None  # a learned query fusion (seed 001), trained by a combiner stage
    # A local Hugging Face sentence encoder as the text tower (docs/real-photos.md)
    text_model: str | None = None
    text_proj: str | None = None  # linear or mlp
    text_context_length: int | None = None
    image_size: int | None = None  # with text_model: the image tower's input size
    image_proj: str | None = None  # with text_model: linear or mlp
    text_unlocked_layers: int | None = None  # -1 all learn, 0 projection only, N top N layers
    image_unlocked_layers: int | None = None
    trunk_lr_scale: float | None = None  # learning rate of the pretrained layers, x the stage's

    def spec(self, arcface_classes: int = 0) -> ModelSpec:
        """The preset's fields, overridden by whatever the config sets explicitly."""
        values = dict(PRESETS[self.preset])
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "preset" and v is not None:
                values[f.name] = v
        return ModelSpec.from_dict({**values, "arcface_classes": arcface_classes})


@dataclass
class PretrainSpec:
    """`stbir-train pretrain`: CLIP-style contrastive training of the image and text towers.

    Pairs come from ``captions`` (CSV with a ``filename,caption`` or ``image,caption`` header,
    photos under ``images``) or, when ``captions`` is empty, from the seed layout's
    ``name<TAB>text`` files of ``data.categories`` (training photos)."""

    captions: str = ""
    images: str = ""
    holdout: float = 0.1  # fraction of the photos kept out of training for the R@k figures
    epochs: int = 5
    lr: float = 5e-4
    weight_decay: float = 0.1
    batch_size: int = 64
    temperature: float = 0.07
    seed: int = 0
    output: str = "pretrain"  # folder, relative to output_dir: clip.pt, last.pt, results.json


@dataclass
class Config:
    output_dir: str = "runs/stbir"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    source: str = ""  # the file this came from (set by load_config, not read from YAML)

    # -- resolved locations ---------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source else Path.cwd()

    def resolve(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)

    @property
    def manifest_dir(self) -> Path:
        return self.out / "manifests"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# -- validation -------------------------------------------------------------------------------

def _build(tp, value, key: str, where: str):
    """Turn a YAML value into ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, key, where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.name != "source"}
        if tp is ModelSection:  # configs written before a rename keep loading
            value = {RENAMED.get(k, k): v for k, v in value.items()}
        for k in value:
            if k not in names:
                raise ConfigError(f"{where}: unknown key {key + '.' if key else ''}{k} "
                                  f"(known: {', '.join(sorted(names))})")
        kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k, where) for k, v in value.items()}
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list")
        return [_build(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping")
        return {str(k): _build(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


def _check_values(cfg: Config, where: str) -> None:
    def bad(key, msg):
        raise ConfigError(f"{where}: {key} {msg}")

    if cfg.model.preset not in PRESETS:
        bad("model.preset", f"must be one of {', '.join(PRESETS)}, got {cfg.model.preset!r}")
    if not 0.0 <= cfg.model.train_sketch_weight <= 1.0:
        bad("model.train_sketch_weight", "must be in [0, 1]")
    if not cfg.training.stages:
        bad("training.stages", "must list at least one stage")
    for i, st in enumerate(cfg.training.stages):
        if st.target not in STAGE_TARGETS:
            bad(f"training.stages[{i}].target", f"must be one of {', '.join(STAGE_TARGETS)}, got {st.target!r}")
        if st.epochs is not None and st.samples is not None:
            bad(f"training.stages[{i}]", "sets both epochs and samples (give one)")
        if st.epochs is None and st.samples is None:
            st.epochs = 1  # what a stage without a length meant before samples existed
        if st.epochs is not None and st.epochs < 0:
            bad(f"training.stages[{i}].epochs", "must be >= 0")
        if st.samples is not None and st.samples < 1:
            bad(f"training.stages[{i}].samples", "must be >= 1")
        if st.lr <= 0:
            bad(f"training.stages[{i}].lr", "must be > 0")
        if st.target == "combiner" and not cfg.model.combiner:
            bad(f"training.stages[{i}].target", "combiner needs model.combiner: true")
    if cfg.training.val_every is not None and cfg.training.val_every < 1:
        bad("training.val_every", "must be >= 1 (samples between validations) or null")
    if cfg.training.patience < 0:
        bad("training.patience", "must be >= 0 (0: no early stopping)")
    if cfg.training.batch_size < 2:
        bad("training.batch_size", "must be >= 2 (contrastive losses need in-batch negatives)")
    if cfg.training.device not in ("auto", "cpu", "cuda"):
        bad("training.device", "must be auto, cpu or cuda")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        bad("data.val_fraction", "must be in [0, 1)")
    if cfg.data.negatives_per_modality < 0:
        bad("data.negatives_per_modality", "must be >= 0")
    if cfg.loss.temperature <= 0:
        bad("loss.temperature", "must be > 0")
    if cfg.loss.fusion_items < 0:
        bad("loss.fusion_items", "must be >= 0")
    if not 0.0 <= cfg.loss.modality_dropout <= 1.0:
        bad("loss.modality_dropout", "must be in [0, 1]")
    for f in dataclasses.fields(LossWeights):
        if getattr(cfg.loss.weights, f.name) < 0:
            bad(f"loss.weights.{f.name}", "must be >= 0")
    pt = cfg.pretrain
    if not 0.0 < pt.holdout < 1.0:
        bad("pretrain.holdout", "must be in (0, 1)")
    if pt.epochs < 0:
        bad("pretrain.epochs", "must be >= 0")
    if pt.lr <= 0 or pt.temperature <= 0:
        bad("pretrain.lr" if pt.lr <= 0 else "pretrain.temperature", "must be > 0")
    if pt.batch_size < 2:
        bad("pretrain.batch_size", "must be >= 2 (contrastive losses need in-batch negatives)")
    if bool(pt.captions) != bool(pt.images):
        bad("pretrain.captions" if pt.images else "pretrain.images",
            "must be set too (a captions file and its images folder go together)")
    if cfg.loss.arcface_labels not in ("category", "virtual_class"):
        bad("loss.arcface_labels", "must be category or virtual_class")
    for name, ov in cfg.data.curriculum_noise.stages.items():
        if name not in STAGE_TARGETS:
            bad(f"data.curriculum_noise.stages.{name}", f"is not a stage target ({', '.join(STAGE_TARGETS)})")
        for mod in ("photo", "sketch"):
            for k in getattr(ov, mod):
                if k not in {f.name for f in dataclasses.fields(NoiseSpec)}:
                    bad(f"data.curriculum_noise.stages.{name}.{mod}.{k}", "is not a noise setting")
    for name, spec in (("photo", cfg.data.curriculum_noise.photo), ("sketch", cfg.data.curriculum_noise.sketch)):
        for k in ("start_prob", "max_prob", "start_strength", "max_strength"):
            if not 0.0 <= getattr(spec, k) <= 1.0:
                bad(f"data.curriculum_noise.{name}.{k}", "must be in [0, 1]")
        if spec.ramp_samples is not None and spec.ramp_samples < 0:
            bad(f"data.curriculum_noise.{name}.ramp_samples", "must be >= 0")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", source)
    cfg.source = source if source != "<dict>" else ""
    _check_values(cfg, source)
    for name, cat in cfg.data.categories.items():
        defaults = dict(train_sketches=f"{name}/trainA", train_images=f"{name}/trainB",
                        test_sketches=f"{name}/testA", test_images=f"{name}/testB",
                        train_text=f"{name}/train.txt", test_text=f"{name}/test.txt")
        for k, v in defaults.items():
            if not getattr(cat, k):
                setattr(cat, k, v)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(data, str(path.resolve()))


def curriculum_noise_yaml(ramp_samples: int) -> str:
    """The curriculum every written config starts with (synth and sketchify): noise ramps up over
    the first ``ramp_samples`` training samples of a stage to 30% of items at 0.4 strength."""
    spec = "start_prob: 0.0, max_prob: 0.3, start_strength: 0.1, max_strength: 0.4"
    return (f"  curriculum_noise:\n    enabled: true\n"
            f"    photo:  {{{spec}, ramp_samples: {ramp_samples}}}\n"
            f"    sketch: {{{spec}, ramp_samples: {ramp_samples}}}\n")

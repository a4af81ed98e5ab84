"""The ``distill`` section of a config (``stbir-train distill``, seed 004); own module so that
``stbir_train.config`` stays within its size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillSpec:
    """The model learns a teacher checkpoint's embedding space. Loss = the ``loss`` section's
    terms + ``embed`` x the per-tower cosine distance to the teacher's vectors + ``relational`` x
    the KL between the teacher's and the student's in-batch query-photo similarity distributions
    (at ``temperature``)."""

    teacher: str = ""  # the teacher's STBIR checkpoint (e.g. teacher_best.pt)
    embed: float = 10.0  # 10, not 3: the student queries its teacher's index as well as its own (docs/distillation.md)
    relational: float = 1.0
    temperature: float = 0.1
    cache: str = "distill_cache"  # folder of cached teacher embeddings, relative to output_dir

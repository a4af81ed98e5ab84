"""What one enroll did: ``EnrollReport`` (counts, skipped files, seconds per phase and per
pipeline stage), as the CLI prints it and ``--json`` writes it."""

from __future__ import annotations

from dataclasses import dataclass, field

from stbir_infer import enroll_pipeline as _pipe

PHASES = ("open", "scan", "drop_missing", "hash", "decode", "encode", "commit")


@dataclass
class EnrollReport:
    """What one enroll did (counts are of files).

    added      files new to the index
    updated    files already indexed whose content changed
    removed    files that left the index (deleted, or no longer a readable image)
    unchanged  files already indexed with the same content
    duplicates of the added/updated files, those whose content was already indexed or appeared
               earlier in this run, so they were not encoded again
    skipped    files not in the index: unreadable, not images, links leaving the images dir, and
               folders that could not be listed (see ``skipped_files``)
    encoded    images run through the image encoder
    timings    seconds per phase (``PHASES``; ``stbir_infer.enroll``'s docstring says what each is)
    stages     seconds per stage of the pipeline: decode, preprocess (on the workers, summed over
               them), encode, index, wait (``enroll_pipeline``)
    Paths are as the file system gives them (``os.fsdecode``); ``to_dict`` shows them with
    ``paths.display``.
    """

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    duplicates: int = 0
    skipped: int = 0
    encoded: int = 0
    total: int = 0  # distinct images in the index afterwards
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    stages: _pipe.Stages = field(default_factory=_pipe.Stages)

    def skip(self, path: str, reason: str) -> None:
        self.skipped += 1
        self.skipped_files.append((path, reason))

    def to_dict(self) -> dict:
        from stbir_infer.paths import display

        d = {k: getattr(self, k) for k in ("added", "updated", "removed", "unchanged", "duplicates",
                                           "skipped", "encoded", "total")}
        d["seconds"] = round(self.seconds, 3)
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        d["stages"] = self.stages.to_dict()
        d["skipped_files"] = [{"path": display(p), "reason": display(r)}
                              for p, r in self.skipped_files]
        return d

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged, {self.duplicates} duplicates, {self.skipped} skipped; "
                f"{self.encoded} encoded; {self.total} images in the index")


__all__ = ["PHASES", "EnrollReport"]

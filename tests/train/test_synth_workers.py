"""`stbir-train synth` renders in several processes and still writes the same dataset."""

from pathlib import Path

from stbir_train.synth import write_dataset


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parallel_synth_writes_the_same_files_as_serial(tmp_path):
    sizes = dict(per_category=5, test_per_category=3, sketches_per_photo=2, seed=7)
    write_dataset(tmp_path / "serial", workers=1, **sizes)
    write_dataset(tmp_path / "parallel", workers=3, **sizes)
    serial, parallel = _tree(tmp_path / "serial"), _tree(tmp_path / "parallel")
    # per category: 5 + 3 photos, 5 x 2 + 3 sketches, train.txt and test.txt; truth and config
    assert len(serial) == 4 * (5 + 3 + 10 + 3 + 2) + 2
    assert serial == parallel
    # captions keep the item order: train.txt lists photos 0..4 of the category
    names = [line.split("\t")[0] for line in serial["star/train.txt"].decode().splitlines()]
    assert names == [f"star_train_{i:05d}.png" for i in range(5)]

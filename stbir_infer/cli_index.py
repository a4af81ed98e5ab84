"""The index-lifecycle commands of ``stbir-infer`` (``stbir_infer.lifecycle``,
``stbir_infer.vectors_export``), registered on the main group by ``stbir_infer.cli``:

    stbir-infer remove --index IDX PATH...          files or folders out of the index
    stbir-infer prune --index IDX                   entries whose files are gone
    stbir-infer relocate --index IDX OLD NEW        the gallery moved from OLD to NEW
    stbir-infer reindex --index IDX --model EXPORT  every photo again, with another export
    stbir-infer export-vectors --index IDX OUT      vectors.npy + entries.jsonl + manifest.json
    stbir-infer duplicates --index IDX [--threshold T]   groups of near-identical photos (lists only)
"""

from __future__ import annotations

import json

import click


def _report(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{report.summary()} ({report.seconds:.1f} s)")


_json_option = click.option("--json", "as_json", is_flag=True, help="JSON output for scripts.")
_yes_option = click.option("--yes", is_flag=True,
                           help="Remove more than 100 photos, or all of an enrolled folder.")


def register(main: click.Group, index_option, model_option) -> None:
    """Add the commands to ``main`` (with the main CLI's --index / --model options)."""

    @main.command()
    @click.argument("paths", nargs=-1, required=True, metavar="PATH...")
    @index_option
    @_yes_option
    @_json_option
    def remove(paths, index_dir, yes, as_json):
        """Take photos (files, or every file under folders) out of the index for good. Lists
        what it removes; more than 100 photos, or a whole enrolled folder, takes --yes."""
        from stbir_infer.lifecycle import remove as run

        _report(run(index_dir, paths, yes=yes, echo=None if as_json else click.echo), as_json)

    @main.command()
    @index_option
    @_yes_option
    @_json_option
    def prune(index_dir, yes, as_json):
        """Drop entries whose files are gone (kept where their whole root is missing). Lists
        what it drops; more than 100 photos, or a whole enrolled folder, takes --yes."""
        from stbir_infer.lifecycle import prune as run

        _report(run(index_dir, yes=yes, echo=None if as_json else click.echo), as_json)

    @main.command()
    @click.argument("old", metavar="OLD_ROOT")
    @click.argument("new", metavar="NEW_ROOT")
    @index_option
    @_json_option
    def relocate(old, new, index_dir, as_json):
        """The gallery moved (another disk, another machine): its roots at or under OLD_ROOT are
        now under NEW_ROOT. Ids, tags and vectors stay."""
        from stbir_infer.lifecycle import relocate as run

        _report(run(index_dir, old, new), as_json)

    @main.command()
    @model_option
    @index_option
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="Threads for onnxruntime, decoding and hnswlib (default: library's).")
    @click.option("--int8", is_flag=True, help="Use the export's int8-quantised graphs.")
    @_json_option
    def reindex(model_dir, index_dir, batch_size, threads, int8, as_json):
        """Encode every photo again with the export --model into a new generation (same ids,
        files and tags); the old one stays live until it is complete."""
        from stbir_infer.lifecycle import reindex as run

        _report(run(index_dir, model_dir, batch_size=batch_size, threads=threads,
                    precision="int8" if int8 else "fp32"), as_json)

    @main.command("export-vectors")
    @click.argument("out_dir", metavar="OUT")
    @index_option
    def export_vectors(out_dir, index_dir):
        """Write the vectors (vectors.npy), entries (entries.jsonl) and a manifest.json to OUT, for
        a vector database or a sharded index."""
        from stbir_infer.paths import display
        from stbir_infer.vectors_export import export_vectors as run

        m = run(index_dir, out_dir)
        click.echo(f"{m['count']} vectors of {m['dim']} dims -> {display(out_dir)}")

    @main.command()
    @index_option
    @click.option("--threshold", type=float, default=None, metavar="T",
                  help="Cosine at or above which two photos count as copies, 0..1 [default: "
                       "0.92, measured by benchmarks/duplicates.py].")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="hnswlib threads (default: library's).")
    @_json_option
    def duplicates(index_dir, threshold, threads, as_json):
        """List groups of near-identical photos (edited, resized, re-encoded copies) with a
        suggested keeper: the most pixels, then the oldest. Lists only; deletes nothing."""
        from stbir_infer.duplicates import DEFAULT_THRESHOLD, find
        from stbir_infer.paths import display

        report = find(index_dir, DEFAULT_THRESHOLD if threshold is None else threshold,
                      threads=threads)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
            return
        for n, group in enumerate(report.groups, 1):
            click.echo(f"group {n}: {len(group.members)} photos, score >= {group.score:.3f}")
            for m in group.members:
                mark = "keep" if m is group.keeper else "    "
                what = "missing" if m.missing else (
                    f"{m.width}x{m.height}, {m.size:,} bytes" if m.width else f"{m.size:,} bytes")
                click.echo(f"  {mark}  {display(m.path)}  ({what})")
        photos = sum(len(g.members) for g in report.groups)
        click.echo(f"{len(report.groups)} group(s), {photos} photos, among {report.photos} in the "
                   f"index at threshold {report.threshold:g} ({report.seconds:.1f} s); nothing "
                   "was deleted")


__all__ = ["register"]

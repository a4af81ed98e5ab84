"""``stbir-infer``: a thin click shell over ``stbir_infer.Searcher``.

    stbir-infer enroll --images DIR [--model EXPORT] [--index IDX] [--batch-size N]
    stbir-infer query [--sketch FILE] [--text "..."] [--image PHOTO] [--top-k K] [--json]
    stbir-infer query --batch QUERIES.jsonl                 one JSON line out per line in
    stbir-infer info [--json]
    stbir-infer serve [--host 127.0.0.1] [--port 8000]     web page + JSON API
    stbir-infer remove|prune|relocate|reindex|export-vectors   the index over its life (cli_index)

``--model`` defaults to $STBIR_MODEL or ./export, ``--index`` to $STBIR_INDEX or ./index.
Exit status: 0 success, 2 bad usage or input (also: index built by another export, another writer
busy), 1 internal failure. Errors are one line on stderr (set STBIR_DEBUG=1 for a traceback).
"""

from __future__ import annotations

import json
import os
import sys

import click

from stbir_infer.cli_errors import OneLineErrors
from stbir_infer.cli_index import register as register_index_commands
from stbir_infer.contract import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M
from stbir_infer.errors import ImageDecodeError, QueryError, StbirInferError
from stbir_infer.index_meta import MAX_EF
from stbir_infer.session import DEFAULT_PROVIDER

PROG = "stbir-infer"


class _Main(OneLineErrors, click.Group):
    """Turns every failure into one line on stderr and an exit status (no tracebacks)."""

    prog = PROG
    known = (StbirInferError, ImageDecodeError)


def _model_option(f):
    return click.option("--model", "model_dir", envvar="STBIR_MODEL", default="export",
                        show_default=True, metavar="EXPORT",
                        help="Export dir (stbir-export output); env STBIR_MODEL.")(f)


def _index_option(f):
    return click.option("--index", "index_dir", envvar="STBIR_INDEX", default="index",
                        show_default=True, metavar="IDX", help="Index dir; env STBIR_INDEX.")(f)


def _runtime_options(f):
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Intra-op threads for onnxruntime and hnswlib (default: library's).")(f)
    f = click.option("--int8", is_flag=True, help="Use the export's int8-quantised graphs.")(f)
    f = click.option("--provider", default=DEFAULT_PROVIDER, show_default=True, metavar="NAME",
                     help="onnxruntime execution provider: cpu, cuda, tensorrt, openvino, coreml, "
                          "dml, ... (one this onnxruntime lacks: the CPU, with a warning).")(f)
    return f


def _min_score(ctx, param, value):
    """--min-score: a number or auto (checked here, so a bad value is a usage error, exit 2)."""
    from stbir_infer.query_spec import parse_min_score

    try:
        return parse_min_score(value)
    except QueryError as exc:
        raise click.BadParameter(f"{value!r} is not a number or auto") from exc


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Sketch + text image search on-device: enroll a photo folder, then query it."""


@main.command()
@click.option("--images", "images_dir", required=True, metavar="DIR",
              help="Folder of photos (walked recursively).")
@_model_option
@_index_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per encoder call.")
@click.option("--hnsw-m", "M", type=click.IntRange(min=2, max=512), default=None,
              help=f"HNSW M for a new index [default: {HNSW_M}].")
@click.option("--ef-construction", type=click.IntRange(min=1, max=MAX_EF), default=None,
              help=f"HNSW ef_construction for a new index [default: {HNSW_EF_CONSTRUCTION}].")
@click.option("--ef-search", type=click.IntRange(min=1, max=MAX_EF), default=None,
              help=f"Store this query-time ef as the index's default [default: {HNSW_EF_SEARCH}].")
@_runtime_options
@click.option("--follow-external-links", is_flag=True,
              help="Also index files reached by symbolic links that leave the images folder "
                   "(by default they are skipped and listed).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Tag every photo of the folder (repeatable); query --where KEY=VALUE filters.")
@click.option("--edge-gallery/--no-edge-gallery", default=None,
              help="A new index also stores each photo's pseudo-sketch vector, which sketch "
                   "queries score against too (docs/human-sketches.md) [default: on]; an "
                   "existing index keeps what it has.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (with seconds per phase in \"timings\").")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no list of skipped files.")
def enroll(images_dir, model_dir, index_dir, batch_size, M, ef_construction, ef_search, threads,
           int8, provider, follow_external_links, tags, edge_gallery, as_json, quiet):
    """Add a photo folder to the index, or refresh it (only new or changed files are encoded)."""
    from stbir_infer.paths import display
    from stbir_infer.searcher import Searcher

    searcher = Searcher(model_dir, index_dir, threads=threads, ef_search=ef_search, M=M,
                        ef_construction=ef_construction, precision="int8" if int8 else "fp32",
                        provider=provider)
    show_bar = not quiet and not as_json and sys.stderr.isatty()
    report = searcher.enroll(images_dir, batch_size=batch_size, progress=show_bar,
                             follow_external_links=follow_external_links, tags=tags,
                             edge_gallery=edge_gallery)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if not quiet:
        for path, reason in report.skipped_files[:10]:
            click.echo(f"skipped: {display(path)}: {display(reason)}", err=True)
        if len(report.skipped_files) > 10:
            click.echo(f"skipped: ... and {len(report.skipped_files) - 10} more", err=True)
    click.echo(f"{report.summary()} ({report.seconds:.1f} s)")


@main.command()
@click.option("--sketch", "sketch", metavar="FILE", default=None, help="Sketch image file.")
@click.option("--text", "text", metavar="TEXT", default=None, help="Words the sketch can't say.")
@click.option("--image", "image", metavar="PHOTO", default=None,
              help="An example photo: find photos like it (alone, or with --text / --sketch). "
                   "When the photo itself is enrolled it comes first, marked same_file.")
@click.option("--image-weight", type=click.FloatRange(0, 1), default=None, metavar="W",
              help="Share of the example photo when combined with --text / --sketch, 0..1 "
                   "[default: 0.5, picked on Flickr8k validation].")
@click.option("--batch", "batch", metavar="FILE", default=None,
              type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="Many queries in one process: a JSON-lines file (- for stdin), one "
                   "{\"sketch\": path, \"text\": ..., \"top_k\": ...} a line; prints one JSON line "
                   "each (an error record for a bad line, then exit status 2). See "
                   "stbir_infer/batch_query.py.")
@click.option("--top-k", "-k", "top_k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON output for scripts.")
@_model_option
@_index_option
@click.option("--ef-search", type=click.IntRange(min=1, max=MAX_EF), default=None,
              help="HNSW search breadth for this query [default: the index's].")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Also write a contact sheet PNG: the sketch, the caption and the top hits.")
@click.option("--expect", type=click.Path(dir_okay=False), default=None,
              help="The photo that should come first: say where it ranked.")
@click.option("--sketch-weight", type=click.FloatRange(0, 1), default=None, metavar="W",
              help="Share of the sketch in a sketch+text query, 0..1 (1: sketch only, 0: text "
                   "only) [default: the export's, picked on validation].")
@click.option("--min-score", default=None, metavar="S|auto", callback=_min_score,
              help="Drop hits scoring below S; auto: the export's validation threshold "
                   "(FAR 1e-3) for the query's mode. None left: prints 'no match above S'.")
@click.option("--where", "where", multiple=True, metavar="KEY=VALUE",
              help="Only photos in folder=F (relative to the enrolled folder, or below it) or "
                   "with tag KEY=VALUE (enroll --tag); repeat a key for OR, keys for AND.")
@_runtime_options
def query(sketch, text, image, image_weight, batch, top_k, as_json, model_dir, index_dir,
          ef_search, sheet, expect, sketch_weight, min_score, where, threads, int8, provider):
    """Find photos by a sketch, a text, an example photo, or several (fused as the export says)."""
    if batch is not None:
        if sketch is not None or text is not None or image is not None or sheet or expect:
            raise click.UsageError("--batch takes the queries from its file: no --sketch, "
                                   "--text, --image, --sheet or --expect with it")
        from stbir_infer.batch_query import run_batch
        from stbir_infer.searcher import Searcher

        with click.open_file(batch, "rb") as stream:  # "-": stdin
            searcher = Searcher(model_dir, index_dir, threads=threads, ef_search=ef_search,
                                precision="int8" if int8 else "fp32", provider=provider)
            total, failed = run_batch(searcher, stream, click.echo, top_k=top_k,
                                      sketch_weight=sketch_weight, min_score=min_score,
                                      where=list(where) or None, image_weight=image_weight)
        if failed:
            raise QueryError(f"{failed} of {total} queries failed (see their error records)")
        return
    if sketch is None and image is None and (text is None or not text.strip()):
        raise click.UsageError("give --sketch FILE, --text TEXT, --image PHOTO or several")
    for name, path in (("--sketch", sketch), ("--image", image)):
        if path is not None and not os.path.isfile(path):
            raise click.BadParameter(f"{path}: no such file", param_hint=name)
    from stbir_infer.paths import display
    from stbir_infer.query_spec import QuerySpec
    from stbir_infer.searcher import Searcher

    spec = QuerySpec.parse(sketch=sketch, text=text, image=image, top_k=top_k,
                           sketch_weight=sketch_weight, image_weight=image_weight,
                           min_score=min_score, where=where)
    searcher = Searcher(model_dir, index_dir, threads=threads, ef_search=ef_search,
                        precision="int8" if int8 else "fp32", provider=provider)
    floor = searcher.min_score_for(spec.min_score, mode=spec.mode)
    hits = searcher.answer(spec)
    if sheet:
        from stbir_infer.sheet import contact_sheet

        contact_sheet([{"sketch": sketch, "text": text, "hits": hits, "target": expect}], sheet, top_k)
    if as_json:
        from stbir_infer.batch_query import describe_query

        # Paths in display form (valid UTF-8; Hit.to_dict adds path_bytes_b64 where it differs)
        out = {"query": describe_query(searcher, spec),
               "model": searcher.encoders.fingerprint, "index": display(searcher.index_dir),
               "results": [h.to_dict() for h in hits]}
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    if not hits and floor is not None:
        click.echo(f"no match above {floor:.4f}")
    elif not hits and where:
        click.echo("no results: no entry of the index matches --where", err=True)
    elif not hits:
        click.echo("no results: the index is empty", err=True)
    for h in hits:
        same = "  (the example photo itself)" if h.same_file else ""
        click.echo(f"{h.rank:>4}  {h.score:.4f}  {display(h.path)}{same}")
    if expect:
        want = os.path.realpath(expect)
        rank = next((h.rank for h in hits if want in {os.path.realpath(p) for p in [h.path, *h.duplicates]}), None)
        click.echo(f"expected photo ranked {'first' if rank == 1 else rank or f'below the top {top_k}'}")
    if sheet:
        click.echo(f"contact sheet: {display(sheet)}")


@main.command()
@_model_option
@_index_option
@click.option("--verify", is_flag=True,
              help="Also check every export file against the sha256 in export.json.")
@click.option("--json", "as_json", is_flag=True, help="JSON output for scripts.")
def info(model_dir, index_dir, as_json, verify):
    """Index size, the model it was built with, HNSW parameters."""
    from stbir_infer.paths import display
    from stbir_infer.searcher import Searcher

    searcher = Searcher(model_dir, index_dir)  # loading the index checks its sha256s
    data = searcher.info()
    if verify:  # every export file against export.json, not only those a query reads
        data["verified"] = searcher.encoders.verify()
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    exp = data["export"]
    click.echo(f"model:       {display(exp['model_dir'])}")
    click.echo(f"  clip_model {exp['clip_model']}, embed_dim {exp['embed_dim']}, "
               f"fusion_weight {exp['fusion_weight']}, fingerprint {exp['fingerprint'][:12]}")
    fus = exp.get("fusion") or {}
    thr = fus.get("score_threshold")
    click.echo(f"  fusion {fus.get('method')}, default sketch weight {fus.get('default_weight')}; "
               + (f"score thresholds at FAR {thr['far']:g}: " + ", ".join(
                   f"{m} {t:.4f}" for m, t in thr["modes"].items()) if thr else "no score threshold"))
    click.echo(f"index:       {data['index_dir']}")
    if not data["exists"]:
        click.echo("  (empty: run `stbir-infer enroll --images DIR`)")
        return
    h = data["hnsw"]
    click.echo(f"  images {data['images']}, files {data['files']}, skipped {data['skipped_files']}, "
               f"generation {data['generation']}, updated {data['updated']}")
    click.echo(f"  hnsw: space {data['space']}, dim {data['dim']}, M {h['M']}, "
               f"ef_construction {h['ef_construction']}, ef_search {h['ef_search']}")
    for root in data["roots"]:  # already in display form
        click.echo(f"  root: {root}")
    if data.get("load_error"):
        click.echo(f"  newest generation not loaded: {data['load_error']}")
    if verify:
        v = data["verified"]
        click.echo(f"verified:    {v['files']} export files ({v['bytes'] / 1e6:.1f} MB) match export.json")


@main.command()
@_model_option
@_index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback exposes the gallery).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free one).")
@click.option("--max-body-mb", type=click.FloatRange(min=0.01), default=10.0, show_default=True,
              help="Largest request body accepted, in MiB.")
@_runtime_options
@click.option("-q", "--quiet", is_flag=True, help="No request log.")
def serve(model_dir, index_dir, host, port, max_body_mb, threads, int8, provider, quiet):
    """A local web page (draw, type, see photos) and JSON API; models and index loaded once."""
    from stbir_infer.web.server import serve as run_server

    run_server(model_dir, index_dir, host=host, port=port, threads=threads,
               precision="int8" if int8 else "fp32", provider=provider,
               max_body=int(max_body_mb * (1 << 20)),
               quiet=quiet)


register_index_commands(main, _index_option, _model_option)  # remove, prune, relocate, ...

if __name__ == "__main__":
    main()

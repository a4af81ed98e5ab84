"""`stbir-train`: train (the default verb), plus `synth`, `manifest`, `evaluate` and `distill`.

Library code raises specific exceptions; only the edge (``stbir_infer.cli_errors``) turns them into
one line on stderr and an exit status (2: bad input or usage, 1: training could not go on).
"""

from __future__ import annotations

import click

from stbir_infer.cli_errors import command_class
from stbir_infer.contract import BRANCHES

PROG = "stbir-train"
KNOWN_ERRORS = ("stbir_train.errors:StbirTrainError", "models.errors:StbirModelError")
_Main = command_class(click.Group, PROG, KNOWN_ERRORS, interrupted=(
    "interrupted; checkpoints written so far are intact (resume with --resume last.pt)"))


@click.group(cls=_Main, invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config to train with.")
@click.option("--stage", type=click.Choice([*BRANCHES, "all", "combiner"]), help="Run only this stage.")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from this checkpoint (e.g. last.pt).")
@click.pass_context
def main(ctx, config_path, stage, resume):
    """Train the tri-modal model: stbir-train --config CONFIG [--stage S] [--resume CKPT]."""
    if ctx.invoked_subcommand is not None:
        if config_path or stage or resume:
            raise click.UsageError("--config/--stage/--resume go after the subcommand")
        return
    if not config_path:
        raise click.UsageError("--config is required to train (or use a subcommand: synth, manifest, "
                               "pretrain, distill, evaluate)")
    from stbir_train.config import load_config
    from stbir_train.train import train

    cfg = load_config(config_path)
    summary = train(cfg, only_stage=stage, resume=resume, log=click.echo)
    if summary["best"] is None:
        click.echo(f"no validation rows, so best.pt is the last epoch's weights; checkpoints: "
                   f"{summary['best_path']}, {summary['last_path']}")
    else:
        click.echo(f"best validation sketch+text R@1 {summary['best']:.3f}; checkpoints: "
                   f"{summary['best_path']}, {summary['last_path']}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--per-category", default=500, show_default=True, help="Training photos per category.")
@click.option("--test-per-category", default=100, show_default=True, help="Test photos per category.")
@click.option("--sketches-per-photo", default=2, show_default=True, help="Training sketches per photo.")
@click.option("--seed", default=0, show_default=True)
def synth(out_dir, per_category, test_per_category, sketches_per_photo, seed):
    """Write the built-in sketch+text dataset and a config that trains on it."""
    import time

    from stbir_train.synth import SHAPES, write_dataset

    if per_category < 1 or test_per_category < 1 or sketches_per_photo < 1:
        raise click.UsageError("sizes must be >= 1")
    t0 = time.time()
    config = write_dataset(out_dir, per_category, test_per_category, sketches_per_photo, seed)
    n = len(SHAPES)
    click.echo(f"wrote {n * per_category} training and {n * test_per_category} test photos "
               f"({n} categories) in {time.time() - t0:.1f}s; config: {config}")


@main.command()
@click.argument("photos_dir", type=click.Path(file_okay=False))
@click.argument("captions", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["canny", "xdog", "contour"]), default="canny",
              show_default=True, help="Pseudo-sketch recipe: an edge extraction (canny, xdog) or "
              "the long strokes of the salient object (contour; needs scikit-image).")
@click.option("--test", "test_photos", default=100, show_default=True, help="Photos in the test split.")
@click.option("--sketches-per-photo", default=3, show_default=True, help="Training sketch variants per photo.")
@click.option("--limit", default=0, show_default=True, help="Use only the first N photos (0: all).")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True),
              help="torchvision mobilenet_v2 weights for both visual towers, written into the config.")
@click.option("--split", "split_file", type=click.Path(dir_okay=False),
              help="CSV image,split (e.g. Flickr8k's split.csv): 'train' photos train, the rest "
              "are the test split (instead of --test random photos).")
@click.option("--text-model", type=click.Path(file_okay=False),
              help="A local Hugging Face sentence encoder folder (config.json, model.safetensors, "
              "tokenizer.json): the config then uses it as the text tower (the real-photo recipe).")
@click.option("--seed", default=0, show_default=True)
def sketchify(photos_dir, captions, out_dir, method, test_photos, sketches_per_photo, limit, weights,
              split_file, text_model, seed):
    """Captioned photos (CSV image,caption) -> pseudo-sketch training data + config.yaml."""
    import time

    from stbir_train.sketchify import write_dataset

    if sketches_per_photo < 1 or limit < 0:
        raise click.UsageError("--sketches-per-photo must be >= 1 and --limit >= 0")
    t0 = time.time()
    if text_model:  # a wrong folder is one line now, not after the sketches are drawn
        from models.hf_text import read_text_model

        read_text_model(text_model)
    config = write_dataset(photos_dir, captions, out_dir, method=method, test=test_photos,
                           sketches_per_photo=sketches_per_photo, limit=limit, seed=seed,
                           weights=weights, split=split_file, text_model=text_model,
                           log=click.echo)
    click.echo(f"done in {time.time() - t0:.1f}s; config: {config}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=None, help="Overrides data.manifest_seed.")
def manifest(config_path, seed):
    """Build train/val/test JSONL manifests with hard negatives."""
    from stbir_train.config import load_config
    from stbir_train.manifest import build_manifests, read_manifest_rows

    cfg = load_config(config_path)
    for split, path in build_manifests(cfg, seed).items():
        click.echo(f"{split}: {len(read_manifest_rows(path))} rows -> {path}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from pretrain's last.pt.")
def pretrain(config_path, resume):
    """CLIP-style pretraining of the image and text towers on photo-caption pairs (seed 003)."""
    from stbir_train.config import load_config
    from stbir_train.pretrain import pretrain as run_pretrain

    cfg = load_config(config_path)
    summary = run_pretrain(cfg, resume=resume, log=click.echo)
    click.echo(f"weights: {summary['weights']} (set model.pretrained to it); "
               f"held-out R@k: {summary['results']}")


@main.command("sketch-tune")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def sketch_tune(config_path):
    """Fine-tune a checkpoint's sketch tower: pseudo-sketches towards their photo and its edge
    drawing, optionally mixed with real sketch/photo pairs (stbir_train.sketch_tune)."""
    from stbir_train.sketch_tune import load_tune_config, tune

    tune(load_tune_config(config_path), log=click.echo)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from this run's last.pt.")
def distill(config_path, resume):
    """Train the config's model into the embedding space of distill.teacher (a checkpoint):
    the usual losses plus per-tower cosine and relational KD to the teacher's cached vectors."""
    from stbir_train.config import load_config
    from stbir_train.distill import distill as run_distill

    cfg = load_config(config_path)
    summary = run_distill(cfg, resume=resume, log=click.echo)
    best = "none (no validation rows)" if summary["best"] is None else f"{summary['best']:.3f}"
    click.echo(f"best validation sketch+text R@1 {best}; checkpoints: {summary['best_path']}, "
               f"{summary['last_path']} (space of teacher {summary['teacher']['file']}: "
               f"{summary['teacher']['space'][:12]})")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--compare", type=click.Path(dir_okay=False),
              help="A second checkpoint (e.g. trained with stages: [all]) ranked on the same test set.")
@click.option("--out", type=click.Path(dir_okay=False), help="results.json path (default: OUTPUT_DIR/results.json).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
def evaluate(config_path, checkpoint, compare, out, split):
    """Rank the test gallery for sketch, text and sketch+text queries (both fusions where the
    checkpoint has a Combiner), image->text; EER and FRR@FAR per mode; print and save metrics."""
    from stbir_train.config import load_config
    from stbir_train.evaluate import run_evaluation

    cfg = load_config(config_path)
    results = run_evaluation(cfg, checkpoint, split, compare=compare, out=out, echo=click.echo)
    click.echo(f"results: {results}")


if __name__ == "__main__":
    main()

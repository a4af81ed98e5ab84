"""``stbir-export CKPT OUT_DIR``: the command line around ``export_checkpoint``.

Every failure is one line on stderr (``stbir-export: error: ...``), never a traceback: exit 2 for
bad usage or bad input, 1 for an internal failure (``stbir_infer.cli_errors``; set STBIR_DEBUG=1
for a traceback).
"""

from __future__ import annotations

import click

from stbir_infer.cli_errors import command_class

PROG = "stbir-export"
KNOWN_ERRORS = ("stbir_export.errors:ExportError", "models.errors:StbirModelError")


@click.command(cls=command_class(click.Command, PROG, KNOWN_ERRORS),
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", metavar="CKPT")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write *.int8.onnx: static int8 (calibrated) for the sketch and image "
              "towers where it measures faster, dynamic int8 for the rest.")
@click.option("--calibration", default="auto", show_default=True, metavar="DIR|auto|none",
              help="Calibration images for static int8: auto = the checkpoint's training data; "
              "DIR = a folder of images (subfolders sketches/ and photos/ each serve their "
              "tower); none = dynamic int8 only.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--no-verify", is_flag=True,
              help="Skip the onnxruntime / ReferenceEvaluator comparison with torch.")
@click.option("--fusion", type=click.Choice(["auto", "combiner", "mean"]), default="auto",
              show_default=True, help="Query fusion: auto = the Combiner only where validation "
              "measured it better; mean = the weighted mean (no combiner.onnx).")
@click.option("--threshold-far", type=click.Choice(["0.01", "0.001", "0.0001"]), default="0.001",
              show_default=True, help="FAR on validation whose score threshold goes into export.json.")
def main(checkpoint, out_dir, quantize, calibration, opset, force, no_verify, fusion,
         threshold_far):
    """Export an STBIR checkpoint to separate ONNX graphs + runtime assets in OUT_DIR."""
    from stbir_export import export_checkpoint

    export_checkpoint(checkpoint, out_dir, opset=opset, quantize=quantize,
                      verify=not no_verify, force=force, fusion=fusion,
                      threshold_far=float(threshold_far), log=click.echo,
                      calibration=None if quantize is None or calibration == "none"
                      else calibration)


if __name__ == "__main__":
    main()

"""``stbir-export CKPT OUT_DIR``: the command line around ``export_checkpoint``.

Every failure is one line on stderr (``stbir-export: error: ...``), never a traceback: exit 2 for
bad usage or bad input, 1 for an internal failure.
"""

from __future__ import annotations

import sys

import click

PROG = "stbir-export"


def _fail(message: str, code: int):
    click.echo(f"{PROG}: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class _OneLineErrors(click.Command):
    """click prints usage errors as a multi-line block; keep them to one line like ours."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            super().main(args, prog_name or PROG, complete_var, False, **extra)
        except click.UsageError as exc:
            _fail(f"{exc.format_message()} (see {PROG} --help)", 2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(0)


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", metavar="CKPT")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write *.int8.onnx (onnxruntime dynamic quantisation).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--no-verify", is_flag=True,
              help="Skip the onnxruntime / ReferenceEvaluator comparison with torch.")
def main(checkpoint, out_dir, quantize, opset, force, no_verify):
    """Export an STBIR checkpoint to separate ONNX graphs + runtime assets in OUT_DIR."""
    from models import CheckpointError
    from stbir_export import ExportError, export_checkpoint

    try:
        export_checkpoint(checkpoint, out_dir, opset=opset, quantize=quantize,
                          verify=not no_verify, force=force, log=click.echo)
    except (ExportError, CheckpointError) as exc:
        _fail(exc, 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # an internal failure: still one line, but say it is ours
        _fail(f"internal error: {type(exc).__name__}: {exc}", 1)


if __name__ == "__main__":
    main()

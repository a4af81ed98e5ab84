"""One error edge for the three commands (stbir-train, stbir-export, stbir-infer).

Library code raises specific exceptions; only here do they become one line on stderr and an
exit status:

- a known error (an instance of a class in ``known``): ``PROG: error: <message>``, exit
  ``exc.exit_code`` (2 when the class has none: bad usage or bad input);
- a click usage error: one line ending ``(see `PROG CMD --help`)``, exit 2;
- Ctrl-C: ``PROG: interrupted`` (or the command's own note), exit 130;
- a pipe closed early downstream (``| head``): quietly, exit 1;
- anything else is a bug or a failure below us: ``PROG: error: internal error: Type: first line
  (set STBIR_DEBUG=1 for a traceback)``, exit 1.

With ``STBIR_DEBUG=1`` in the environment, known and unknown errors propagate with their
traceback. ``known`` entries are classes, or ``"module:Class"`` strings resolved only from modules
already imported (an exception of a module nobody imported cannot have been raised), so this
module imports nothing but click, os and sys, and a command's ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import click

DEBUG_ENV = "STBIR_DEBUG"


def _known_classes(known) -> tuple[type, ...]:
    out = []
    for entry in known:
        if isinstance(entry, type):
            out.append(entry)
            continue
        module, _, name = entry.partition(":")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(prog: str, message: object, code: int) -> int:
    click.echo(f"{prog}: error: {one_line(message)}", err=True)
    return code


def run_cli(prog: str, invoke, known=(), interrupted: str = "interrupted"):
    """Call ``invoke()`` and map what it raises to (a line on stderr, an exit status).

    Returns ``(exit status, invoke's return value or None)``."""
    try:
        return 0, invoke()
    except click.exceptions.Exit as exc:
        return exc.exit_code, None
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog
        return _fail(prog, f"{exc.format_message()} (see `{where} --help`)", 2), None
    except click.ClickException as exc:
        return _fail(prog, exc.format_message(), exc.exit_code), None
    except (click.Abort, KeyboardInterrupt):
        click.echo(f"{prog}: {interrupted}", err=True)
        return 130, None
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process: the reader is gone
        return 1, None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if isinstance(exc, _known_classes(known)):
            return _fail(prog, exc, int(getattr(exc, "exit_code", 2))), None
        lines = str(exc).strip().splitlines()
        detail = f": {lines[0][:300]}" if lines else ""
        return _fail(prog, f"internal error: {type(exc).__name__}{detail} "
                           f"(set {DEBUG_ENV}=1 for a traceback)", 1), None


class OneLineErrors:
    """Mixin for a click Command or Group: ``main`` runs through ``run_cli``.

    Subclass with ``prog``, ``known`` and optionally ``interrupted`` set, e.g.
    ``class Main(OneLineErrors, click.Group): prog = "stbir-infer"; known = (...)``; or use
    ``command_class``. An int returned by the command becomes the exit status."""

    prog: str = ""
    known: tuple = ()
    interrupted: str = "interrupted"

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prog = self.prog or prog_name or self.name or "stbir"
        parent = super()

        def invoke():
            return parent.main(args=args, prog_name=prog_name or prog, complete_var=complete_var,
                               standalone_mode=False, **extra)

        code, rv = run_cli(prog, invoke, self.known, self.interrupted)
        if not standalone_mode:
            if code:
                sys.exit(code)
            return rv
        sys.exit(code or (rv if isinstance(rv, int) else 0))


def command_class(base: type, prog: str, known=(), interrupted: str = "interrupted") -> type:
    """``click.Command`` / ``click.Group`` subclass with the one-line error edge, for ``cls=``."""
    return type(f"OneLine{base.__name__}", (OneLineErrors, base),
                {"prog": prog, "known": tuple(known), "interrupted": interrupted})


__all__ = ["DEBUG_ENV", "OneLineErrors", "command_class", "one_line", "run_cli"]

"""The one error edge of the three commands (stbir_infer.cli_errors), through stbir-train."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from stbir_infer.cli_errors import command_class
from stbir_train import cli as train_cli
from stbir_train.errors import ConfigError, DataError, StbirTrainError, TrainingError


class _Known(Exception):
    exit_code = 3


def _command(exc: BaseException | None):
    @click.command(cls=command_class(click.Command, "prog", (_Known, "no.such.module:Err")))
    @click.option("--n", type=int, default=0)
    def cmd(n):
        if exc is not None:
            raise exc
        return 7 if n else None
    return cmd


@pytest.mark.parametrize("exc, code, line", [
    (_Known("bad\ninput"), 3, "prog: error: bad input"),
    (RuntimeError("boom\nsecond line"), 1,
     "prog: error: internal error: RuntimeError: boom (set STBIR_DEBUG=1 for a traceback)"),
    (KeyError(), 1, "prog: error: internal error: KeyError (set STBIR_DEBUG=1 for a traceback)"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
    (click.ClickException("nope"), 1, "prog: error: nope"),
])
def test_each_kind_of_failure_is_one_line_and_its_status(monkeypatch, exc, code, line):
    monkeypatch.delenv("STBIR_DEBUG", raising=False)
    result = CliRunner().invoke(_command(exc), [])
    assert result.exit_code == code
    assert result.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in result.output


def test_usage_errors_are_one_line_with_a_pointer_to_help():
    result = CliRunner().invoke(_command(None), ["--n", "x"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("prog: error: ") and "--help`)" in result.stderr


def test_success_and_an_int_return_value_are_the_exit_status():
    assert CliRunner().invoke(_command(None), []).exit_code == 0
    assert CliRunner().invoke(_command(None), ["--n", "1"]).exit_code == 7


def test_broken_pipe_exits_1_quietly():
    result = CliRunner().invoke(_command(BrokenPipeError()), [])
    assert result.exit_code == 1 and result.stderr == ""


def test_stbir_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("STBIR_DEBUG", "1")
    result = CliRunner().invoke(_command(RuntimeError("boom")), [])
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("exc, code", [(ConfigError("c"), 2), (DataError("d"), 2), (TrainingError("t"), 1)])
def test_training_errors_share_a_base_carrying_the_exit_status(monkeypatch, exc, code):
    assert isinstance(exc, StbirTrainError) and exc.exit_code == code

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr("stbir_train.config.load_config", fail)
    result = CliRunner().invoke(train_cli.main, ["--config", "c.yaml"])
    assert result.exit_code == code and result.stderr == f"stbir-train: error: {exc}\n"


def test_interrupted_training_says_the_checkpoints_are_intact(monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("stbir_train.config.load_config", interrupt)
    result = CliRunner().invoke(train_cli.main, ["--config", "c.yaml"])
    assert result.exit_code == 130 and "checkpoints written so far are intact" in result.stderr

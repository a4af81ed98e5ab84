"""``stbir-infer serve``, the command: one-line errors with exit 2 (no index, no export, bad port,
port in use, the `serve` extra missing), a real run in a subprocess, and cheap imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from web_helpers import N_PHOTOS, Client

from stbir_infer.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_serve_command_errors_are_one_line_exit_2(tmp_path, small_export):
    result = CliRunner().invoke(main, ["serve", "--model", str(small_export),
                                       "--index", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no index here yet" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "noexport"),
                                       "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.output.startswith("stbir-infer: error:")
    result = CliRunner().invoke(main, ["serve", "--port", "70000"])
    assert result.exit_code == 2


def test_serve_command_port_in_use(server, gallery):
    export_dir, index_dir, _, _ = gallery
    port = server.server_address[1]
    result = CliRunner().invoke(main, ["serve", "--model", str(export_dir), "--index", str(index_dir),
                                       "--port", str(port), "--threads", "1"])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_serve_command_runs(gallery):
    """The real command in a subprocess: port 0, the URL on stderr, health, Ctrl+C stops it."""
    import signal

    export_dir, index_dir, _, _ = gallery
    proc = subprocess.Popen([sys.executable, "-m", "stbir_infer", "serve", "--model", str(export_dir),
                             "--index", str(index_dir), "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            # Ctrl+C as in a terminal: a shell's background job (CI run with `&`)
                            # hands its children SIGINT ignored, and Python then keeps it so
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, data = Client("127.0.0.1", port).json("GET", "/api/health")
        assert status == 200 and data["images"] == N_PHOTOS
        proc.send_signal(signal.SIGINT)
        try:  # communicate, not wait: a child blocked on a full stderr pipe would never exit
            rest = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("serve did not stop within 20 s of Ctrl+C; it printed: "
                                 + proc.communicate()[1][-2000:]) from None
        assert proc.returncode == 0, rest
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()




def test_serve_without_the_extra_says_how_to_install_it(tmp_path):
    """waitress missing (the base install): one line naming the extra, exit 2, before any model
    is loaded (the export dir here does not even exist)."""
    code = ("import sys; sys.modules['waitress'] = None; from stbir_infer.cli import main; "
            f"main(['serve', '--model', {str(tmp_path / 'x')!r}, '--index', {str(tmp_path / 'y')!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1
    assert "pip install 'stbir[serve]'" in out.stderr and out.stderr.startswith("stbir-infer: error:")


def test_serve_imports_no_torch_and_cli_stays_cheap():
    code = ("import sys, stbir_infer.cli; assert 'stbir_infer.web' not in sys.modules; "
            "import stbir_infer.web; assert 'waitress' not in sys.modules; "
            "import stbir_infer.web.server; from stbir_infer.web import make_server; "
            "bad = [m for m in ('torch', 'torchvision', 'open_clip', 'models', 'stbir_train', "
            "'stbir_export') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

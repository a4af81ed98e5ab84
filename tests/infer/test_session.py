"""Session settings in one place (stbir_infer.session): options applied, provider names, and the
fallback to the CPU when a provider is absent or fails to start."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from infer_helpers import make_photos, one_error_line, run_cli

from stbir_infer import session
from stbir_infer.encoders import Encoders
from stbir_infer.errors import ProviderError
from stbir_infer.session import CPU, SessionSettings

CUDA = "CUDAExecutionProvider"
needs_no_cuda = pytest.mark.skipif(CUDA in ort.get_available_providers(),
                                   reason="this onnxruntime has CUDA: nothing falls back")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(session, "_warned", set())  # "once per process" starts over per test


def test_options_carry_threads_spinning_and_optimisation():
    opts = SessionSettings(threads=3, spinning=False, optimization="basic").options()
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts = SessionSettings(spinning=True).options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"  # not after a run
    assert opts.intra_op_num_threads == 0  # onnxruntime's default: one per core
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_provider_names_short_or_full_and_unknown_ones_refused():
    assert session.provider_name("cpu") == CPU
    assert session.provider_name("CUDA") == CUDA == session.provider_name(CUDA)
    assert session.provider_name("tensorrt") == "TensorrtExecutionProvider"
    with pytest.raises(ProviderError, match="unknown execution provider 'cdua'.*cuda"):
        SessionSettings(provider="cdua")
    with pytest.raises(ProviderError, match="optimisation"):
        SessionSettings(optimization="max")


@needs_no_cuda
def test_absent_provider_falls_back_to_cpu_with_one_line(export_dir, capsys, tmp_path):
    items = make_photos(tmp_path, ["a.png", "b.png"])
    photos = [tmp_path / n for n in items]
    want = Encoders(export_dir, threads=1).image(photos)
    enc = Encoders(export_dir, threads=1, provider="cuda")
    got = enc.image(photos)
    enc.text(["a red star"])  # a second session: no second line
    Encoders(export_dir, threads=1, provider="cuda").text(["again"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("stbir-infer: warning: execution provider CUDAExecutionProvider")
    assert "running on the CPU" in err[0]
    assert enc.session("image").get_providers() == [CPU]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_provider_that_fails_to_start_falls_back_with_one_line(export_dir, capsys, monkeypatch):
    # onnxruntime lists it but cannot start it (a GPU build without a GPU): simulated by listing
    # CUDA on a build that lacks it; onnxruntime then runs on the CPU, and we say so.
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    enc = Encoders(export_dir, threads=1, provider="cuda")
    assert enc.text(["a red star"]).shape == (1, enc.embed_dim)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stbir-infer: warning: execution provider CUDAExecutionProvider is not "
                   "available (it failed to start); running on the CPU"]


@needs_no_cuda
def test_cli_provider_fallback_and_unknown_provider(export_dir, tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos, ["a.png", "b.png", "c.png"])
    index = tmp_path / "idx"
    result = run_cli("enroll", "--images", photos, "--model", export_dir, "--index", index,
                     "--provider", "cuda", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("CUDAExecutionProvider") == 1 and "CPU" in result.stderr
    result = run_cli("query", "--text", "a red star", "--model", export_dir, "--index", index,
                     "--provider", "cuda", "-k", "2")
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 2
    result = run_cli("query", "--text", "a red star", "--model", export_dir, "--index", index,
                     "--provider", "nope")
    assert result.exit_code == 2 and one_error_line(result.stderr)
    assert "unknown execution provider 'nope'" in result.stderr

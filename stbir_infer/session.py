"""Every onnxruntime session of the runtime is built here, with one set of settings.

``SessionSettings`` holds what a caller may choose: intra-op threads, the execution provider
(``--provider cpu|cuda|...`` on enroll, query and serve), whether idle worker threads spin, and
the graph optimisation level. ``open_session`` turns checked model bytes into a session.

Spinning: onnxruntime's intra-op workers busy-wait between the parallel parts of a run and,
by default, after it. Off here (``SPINNING``), by measurement (``benchmarks/sessions.py``,
docs/benchmarks.md): spinning after a run made a sketch+text query, two sessions one after the
other, 2 to 12 times slower on 2 cores (each session's idle workers spun while the other one
ran). With ``session.force_spinning_stop`` (set below: workers stop when a run returns) spinning
is 1.1-1.4x faster per graph on a quiet machine, but a sketch+text query next to one busy
process still took 2.1x as long as without spinning; a device rarely has its cores to itself.

Providers: a short name (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``, ``dml`` ...:
onnxruntime's provider name without ``ExecutionProvider``, any case) or the full name. One that
this onnxruntime build lacks, or that fails to start (no GPU, no driver), falls back to the CPU
with one line on stderr, once per process; a name onnxruntime does not know is a ProviderError.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from stbir_infer.errors import ExportDirError, ProviderError, first_line

CPU = "CPUExecutionProvider"
DEFAULT_PROVIDER = "cpu"
SPINNING = False
OPTIMIZATION = "all"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
THREADS_PER_CORE = 4
_SUFFIX = "ExecutionProvider"
_warned: set[str] = set()  # providers whose fallback has been reported by this process


def cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def max_threads() -> int:
    """The most ``--threads`` a command takes: more only adds memory and contention
    (``reindex --threads 100000`` took 16.9 GB and a load average over 1,000 on 2 cores)."""
    return THREADS_PER_CORE * cores()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def provider_names() -> dict[str, str]:
    """Short name -> onnxruntime provider name, for every provider onnxruntime knows of."""
    import onnxruntime as ort

    return {name.removesuffix(_SUFFIX).lower(): name for name in ort.get_all_providers()}


def provider_name(value: str) -> str:
    """onnxruntime's name for ``value`` (short or full, any case); ProviderError if unknown."""
    key = str(value).strip().lower().removesuffix(_SUFFIX.lower())
    if key == "cpu":  # without importing onnxruntime: `stbir-infer info` opens no session
        return CPU
    names = provider_names()
    if key not in names:
        raise ProviderError(f"unknown execution provider {value!r} (onnxruntime knows: "
                            f"{', '.join(sorted(names))})")
    return names[key]


@dataclass(frozen=True)
class SessionSettings:
    """How every session of one ``Encoders`` is built (None threads: onnxruntime's default,
    one per core)."""

    threads: int | None = None
    provider: str = DEFAULT_PROVIDER
    spinning: bool = SPINNING
    optimization: str = OPTIMIZATION

    def __post_init__(self):
        if self.threads is not None and not 1 <= int(self.threads) <= max_threads():
            raise ProviderError(f"threads must be between 1 and {max_threads()} "
                                f"({THREADS_PER_CORE} per core on this machine's {cores()}), "
                                f"not {self.threads}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ProviderError(f"graph optimisation {self.optimization!r} is not one of "
                                f"{', '.join(OPTIMIZATION_LEVELS)}")
        provider_name(self.provider)  # an unknown name fails here, not at the first query

    def providers(self, warn: Callable[[str], object] = _stderr) -> list[str]:
        """The provider list for onnxruntime: the chosen one, then the CPU for what it cannot
        run. A provider this build lacks becomes the CPU alone (``warn`` says so, once)."""
        import onnxruntime as ort

        name = provider_name(self.provider)
        if name == CPU:
            return [CPU]
        if name not in ort.get_available_providers():
            _fallback(name, "this onnxruntime build does not have it", warn)
            return [CPU]
        return [name, CPU]

    def options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        spin = "1" if self.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        # Spin only inside a run: idle workers stop when it returns, so the next session's run
        # (a sketch+text query's text graph after its sketch graph) has the cores to itself.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        level = ort.GraphOptimizationLevel
        opts.graph_optimization_level = {
            "disable": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}[self.optimization]
        opts.log_severity_level = 3  # errors only: the provider fallback is reported here
        return opts


def _fallback(name: str, why: str, warn: Callable[[str], object]) -> None:
    if name not in _warned:
        _warned.add(name)
        warn(f"stbir-infer: warning: execution provider {name} is not available ({why}); "
             "running on the CPU")


def open_session(model: bytes | str, settings: SessionSettings, *, label: str = "model",
                 warn: Callable[[str], object] = _stderr):
    """An InferenceSession over ``model`` (the checked bytes of an .onnx file). ExportDirError
    naming ``label`` when onnxruntime cannot load it."""
    import onnxruntime as ort

    providers = settings.providers(warn)
    try:
        with warnings.catch_warnings():  # its own multi-line fallback warning: ours is one line
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(model, sess_options=settings.options(), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportDirError(f"{label}: onnxruntime cannot load it "
                             f"({first_line(exc)})") from None
    if providers[0] != CPU and providers[0] not in sess.get_providers():
        _fallback(providers[0], "it failed to start", warn)  # e.g. no GPU or driver
    return sess


__all__ = ["CPU", "DEFAULT_PROVIDER", "OPTIMIZATION", "SPINNING", "THREADS_PER_CORE",
           "SessionSettings", "cores", "max_threads", "open_session", "provider_name",
           "provider_names"]

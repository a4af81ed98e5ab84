"""The one exception type users of the exporter see."""


class ExportError(ValueError):
    """A user-facing export failure: bad checkpoint, refused or unwritable OUT_DIR, unsupported
    setting, or a graph that does not match the torch model (the message carries the numbers).
    ``stbir-export`` exits with ``exit_code`` (2: bad input)."""

    exit_code = 2

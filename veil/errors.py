"""The typed errors veil raises at its boundaries (CLI, config, files, HTTP).

Every error says what was wrong and how to fix it. Catch ``VeilError`` to catch them all;
the CLI turns them into a one-line message and exit status 2 instead of a traceback.
"""


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class ConfigError(VeilError, ValueError):
    """A configuration value is missing, out of range or inconsistent; the message names the option."""


class DataError(VeilError, ValueError):
    """A data file or folder is missing or malformed; the message names the file and what was expected."""


class CheckpointError(VeilError, ValueError):
    """A checkpoint is missing, of the wrong kind, or lacks a record veil needs."""


class PrivacyError(VeilError, RuntimeError):
    """A request would break a privacy guarantee (an exhausted budget, insecure noise claimed as secure)."""


class EditRefused(PrivacyError):
    """An edit that does not show its released protected values even after its re-dos: it is not released
    (the draw is charged all the same). ``checked`` holds what the checker read, where known."""

    def __init__(self, message: str, checked=None):
        super().__init__(message)
        self.checked = checked


class ExportError(VeilError, ValueError):
    """An ONNX export is missing a file, corrupted, from another version, or does not match PyTorch; the
    message names the file (and, for a failed verification, the measured error and the tolerance)."""

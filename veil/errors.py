"""The typed errors veil raises at its boundaries (CLI, config, files, HTTP).

Every error says what was wrong and how to fix it. Catch ``VeilError`` to catch them all;
the CLI turns them into a one-line message and exit status 2 instead of a traceback.
"""


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class ConfigError(VeilError, ValueError):
    """A configuration value is missing, out of range or inconsistent.

    ``option`` is the option it is about, as the command line spells it (``"--protect"``, ``"dp.epsilon"``);
    ``detail`` says what is wrong with it, without naming it. Each boundary phrases the two its own way:
    ``str(e)`` is the command line's (``"--protect eyeglasses: not an attribute ..."``), the server's is
    ``e.phrase("protect")``. Without an option the detail is the whole message.

        raise ConfigError(f"{value!r}: must be a whole number >= 1", option="--first")
    """

    def __init__(self, detail: str, *, option: str | None = None):
        self.detail = detail
        self.option = option
        super().__init__(self.phrase(option) if option else detail)

    def phrase(self, name: str) -> str:
        """The message with the option called ``name``: a detail that starts with ": ", ", " or "=" joins it
        directly (``--first=0``, ``dp.epsilon: must be ...``), any other after a space (``--out runs/x: ...``).
        (No ``__reduce__``: an exception pickles its args and its ``__dict__``, so detail and option survive.)"""
        return name + ("" if self.detail.startswith((": ", ", ", "=")) else " ") + self.detail


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

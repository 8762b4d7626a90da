"""Error types, each with a one-line message that says what failed and what to do.

Every error a user can cause or meet derives from :class:`DiffgenError`. The CLI turns them
into one line on stderr and an exit code; set ``DIFFGEN_DEBUG=1`` to see the traceback.
Library callers see the real exception.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DiffgenError(Exception):
    """Base class: ``message`` says what failed, ``hint`` what to do about it.

    ``retry`` names flags that would make the same command work, as ``(flag, value)`` pairs:
    a string value sets the flag to it, ``None`` adds an on/off flag, ``False`` removes one. The
    CLI shows the command the user ran with them applied.
    """

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None, *,
                 retry: tuple[tuple[str, str | None | bool], ...] = ()):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retry = tuple(retry)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(DiffgenError):
    """The command line or input asked for something impossible (exit code 2)."""

    exit_code = EXIT_USAGE


class ModelNotFoundError(DiffgenError):
    """No checkpoint under that name: not a directory, not on the Hub, not in the cache."""


class HubUnreachableError(DiffgenError):
    """The checkpoint is not in the local cache and the Hub cannot be (or may not be) reached."""


class NotACheckpointError(DiffgenError):
    """A directory that is not a loadable DiffusionGemma checkpoint."""


class UnsafeCheckpointError(DiffgenError):
    """A checkpoint that only holds pickled weights, which diffgen refuses to load."""


class TokenizerMissingError(DiffgenError):
    """The checkpoint has no tokenizer files."""


class PromptTooLongError(DiffgenError):
    """The prompt plus the requested canvases do not fit the model's context."""


class DeviceError(DiffgenError):
    """The requested device is not available on this machine."""


class DamagedCheckpointError(DiffgenError):
    """A weights file that is truncated or corrupt (e.g. an interrupted download or copy)."""


class ImageError(DiffgenError):
    """An image that cannot be used: not an image, damaged, of an unsupported format or too large."""


class MissingExtraError(DiffgenError):
    """A feature needs an optional extra that is not installed (``pip install 'diffgen[images]'``)."""

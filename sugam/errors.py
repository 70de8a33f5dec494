"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero."""


class SugamError(Exception):
    """Base class: something about the user's input, files or settings is wrong."""


class ModelNotFoundError(SugamError):
    """An alias, path or hub id that names no model we can load."""


class ModelFormatError(SugamError):
    """A model file is truncated, corrupted or of a kind we cannot run."""


class DownloadError(SugamError):
    """Fetching a model failed or produced bytes that do not match the pinned checksum."""


class PromptTooLongError(SugamError):
    """The prompt (plus what it asks to generate) does not fit the context window."""

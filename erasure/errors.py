"""Error classes. Every error a user can cause is an ``ErasureError`` with a message that says what to fix."""


class ErasureError(Exception):
    """Base class of the errors the CLI prints as one line (no traceback)."""


class BaseNotFoundError(ErasureError):
    """``--base`` names neither the toy model, a local pipeline directory, nor a reachable Hub repository."""


class InvalidArgumentError(ErasureError, ValueError):
    """A value given by the user is out of range or malformed."""

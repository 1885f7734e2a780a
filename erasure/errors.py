"""Error classes. Every error a user can cause is an ``ErasureError`` with a message that says what to fix."""


class ErasureError(Exception):
    """Base class of the errors the CLI prints as one line (no traceback)."""


class BaseNotFoundError(ErasureError):
    """``--base`` names neither the toy model, a local pipeline directory, nor a reachable Hub repository."""


class UnsupportedBaseError(ErasureError):
    """The base pipeline loads but is not of a family erasure trains and serves (see erasure.conditioning)."""


class InvalidArgumentError(ErasureError, ValueError):
    """A value given by the user is out of range or malformed."""


class PackError(ErasureError):
    """A concept pack was refused. ``pack`` names it; nothing was applied to any model."""

    def __init__(self, pack: str, reason: str):
        self.pack, self.reason = pack, reason
        super().__init__(f"pack {pack}: {reason}")


class PackIntegrityError(PackError):
    """A file of the pack is missing, unexpected, unsafe (pickle) or does not match its sha256."""


class PackMismatchError(PackError):
    """The pack was built for another base: its touched tensors differ in name, shape or value."""


class ExportError(ErasureError):
    """A pack cannot be written in the format asked for (e.g. a delta a LoRA cannot express)."""


class UnknownConceptError(InvalidArgumentError):
    """A concept the judge cannot read (the red team can only measure concepts its judge recognises)."""

"""Registry errors. Each is an ``ErasureError``: the CLI prints it as one line that says what to fix."""

from __future__ import annotations

from erasure.errors import ErasureError


class RegistryError(ErasureError):
    """Base class of registry errors."""


class PackNotFoundError(RegistryError):
    """No such repository in the registry."""


class RevisionNotFoundError(RegistryError):
    """The repository exists but has no such branch, tag or commit."""


class VerificationError(RegistryError):
    """A pulled file does not match the manifest / the registry's hash; nothing was written to the target."""


class PushError(RegistryError):
    """A push failed; the repository shows no new commit."""


class AccessDeniedError(PushError):
    """The registry refused the credentials (HTTP 401/403): no token, a wrong token, or no write access."""


class QuickCheckError(RegistryError):
    """A freshly trained pack failed its quick erasure check, so it was not published."""


class TrainManyError(RegistryError):
    """Some packs of a catalogue failed (each with its own error); the others were trained and published."""


class MissingExtraError(RegistryError):
    """A command needs an optional dependency that is not installed (the message says what to install)."""


class ClusterError(RegistryError):
    """The Ray cluster could not be reached (``--ray ADDRESS``) or a local one could not be started."""

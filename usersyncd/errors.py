"""The exception tree: one root, translated from driver errors where they enter."""

from __future__ import annotations


class UserSyncError(Exception):
    """usersyncd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class ConfigError(UserSyncError):
    """The configuration is invalid."""


class DatabaseError(UserSyncError):
    """The database could not be used."""


class SourceError(DatabaseError):
    """The source table or one of its columns is missing or unreadable."""


class DeliveryError(UserSyncError):
    """A batch could not be delivered to the API."""


class TransientDeliveryError(DeliveryError):
    """The API failed in a way that may succeed on retry."""


class PermanentDeliveryError(DeliveryError):
    """The API rejected the batch; retrying it unchanged cannot succeed."""


class Stopping(UserSyncError):
    """Shutdown was requested; the batch goes back to the queue."""

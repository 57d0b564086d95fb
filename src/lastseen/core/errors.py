"""The package's exceptions: one base class, small subclasses that carry their data.

HTTP status codes are chosen in the HTTP layer (``ingest.py``, ``web.py``), not here.
"""

from __future__ import annotations


class LastseenError(Exception):
    """Base class of every error lastseen raises on purpose."""


class ConfigError(LastseenError):
    """A setting has a value that cannot work."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


class InvalidCallback(LastseenError):
    """A request body is not a valid callback; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class InvalidRequest(LastseenError):
    """A request to a route other than ``POST /callback`` that cannot be served as asked."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Unauthorized(LastseenError):
    """A request without the credentials its route needs; the message says what is missing
    (never what was expected)."""


class RateLimited(LastseenError):
    """A client sent more than its rate; it may send again after ``wait`` seconds."""

    def __init__(self, rate: float, wait: float) -> None:
        super().__init__(f"more than {rate:g} callbacks per second")
        self.rate = rate
        self.wait = wait


class IdempotencyConflict(LastseenError):
    """An idempotency key already stored with another body."""

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was used with another body")


class TooManyIds(InvalidCallback):
    """A callback names more ids than one callback may."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__("too_many_ids", f"{count} ids; at most {limit} per callback")


class ImportSourceError(LastseenError):
    """An import cannot read its source: a file that cannot be opened, a CSV without the
    column to read."""


class DatabaseError(LastseenError):
    """PostgreSQL failed or could not be reached; the driver's error is the ``__cause__``."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"{operation}: {detail}")
        self.operation = operation
        self.detail = detail


class DatabaseUnavailable(DatabaseError):
    """The connection failed or timed out: worth retrying later."""


class RetryableConflict(DatabaseError):
    """A deadlock or serialization failure: the same transaction may simply be run again."""


class CommitTimeout(LastseenError):
    """A callback was not committed within the commit timeout; it was not acknowledged."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"not committed within {timeout:g} s")
        self.timeout = timeout


class SpoolFull(LastseenError):
    """The spool is at its size bound: the callback was not stored."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the spool is full ({max_bytes} bytes)")
        self.max_bytes = max_bytes


class SpoolFailed(LastseenError):
    """The spool's file could not be written or read (a full disk, a broken file)."""


class NotAccepting(LastseenError):
    """The instance takes no callbacks now: it is starting up or shutting down."""


class EmbeddedPostgresError(LastseenError):
    """The embedded PostgreSQL could not be started or stopped."""


class LookupFailed(LastseenError):
    """One upstream lookup failed; ``permanent`` says whether retrying could help."""

    def __init__(self, object_id: int, reason: str, detail: str, *, permanent: bool) -> None:
        # The detail ends up in a text column: PostgreSQL refuses NUL, and an upstream can
        # answer anything. Keep it printable and short.
        detail = detail.replace("\x00", "\\0")[:500]
        super().__init__(f"object {object_id}: {reason}: {detail}")
        self.object_id = object_id
        self.reason = reason
        self.detail = detail
        self.permanent = permanent

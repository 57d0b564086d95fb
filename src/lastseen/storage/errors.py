"""Driver errors turned into the package's own at the database edge, classified by what the
caller should do: ``DatabaseUnavailable`` (the database cannot take this now: wait, spool),
``RetryableConflict`` (run the transaction again) or ``DatabaseError`` (a fault: fail)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import asyncpg

from lastseen.core.errors import DatabaseError, DatabaseUnavailable, RetryableConflict

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

# The database cannot take this now, whatever the statement: wait for it (spool, outage state).
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    # A connection lost in the middle of an operation can leave asyncpg's protocol in a state
    # it reports this way ("cannot switch to state 15; another operation is in progress").
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # 08: the connection failed
    asyncpg.OperatorInterventionError,  # 57: shut down, in recovery, cannot connect now
    asyncpg.InterfaceError,
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a standby, or a server set read-only
    asyncpg.InsufficientResourcesError,  # 53: disk full, out of memory, too many connections
    asyncpg.InvalidAuthorizationSpecificationError,  # 28: a login refused (a rotated password)
    asyncpg.PostgresSystemError,  # 58: the server's own I/O failed
)
_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def translate(operation: str, exc: BaseException) -> DatabaseError:
    """The package's own error for a driver error."""
    if isinstance(exc, asyncpg.DataError):  # a bad argument, although an InterfaceError
        return DatabaseError(operation, str(exc))
    if isinstance(exc, _RETRYABLE):
        return RetryableConflict(operation, str(exc))
    if isinstance(exc, UNAVAILABLE):
        return DatabaseUnavailable(operation, str(exc) or type(exc).__name__)
    return DatabaseError(operation, str(exc) or type(exc).__name__)


def edge(
    method: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except (asyncpg.PostgresError, *UNAVAILABLE) as exc:
            raise translate(method.__name__, exc) from exc

    return cast("Callable[Concatenate[S, P], Coroutine[Any, Any, R]]", wrapper)

"""The one exception tree of rescan.

Library exceptions (imaplib, exchangelib, yara, sqlite3, OSError) are translated into these at
one boundary per module (connectors have a ``map_*_errors()`` context manager). Messages never
contain secrets. The CLI turns any ``RescanError`` into one line on stderr and exit code 2.

::

    RescanError
    ├── UsageError          bad arguments or configuration
    ├── DefinitionsError    rules missing or not compiling (names file and line)
    ├── SourceError         a store that cannot be opened or read
    │   ├── AuthError       credentials refused (never retried)
    │   └── TransientError  dropped connection, timeout, throttling (retried with backoff)
    ├── FetchError          one message could not be fetched (its verdict becomes ``error``)
    ├── ActionError         an action failed; the original message is left in place
    ├── StateError          the state store cannot be used
    │   └── LockedError     another live run holds the state lock
    ├── WorkerCrashed       the worker process running a task died
    ├── TaskTimeout         a task ran past its time limit; its worker was killed
    └── InitializerFailed   a worker could not load the engines: no task can run
"""


class RescanError(Exception):
    """Base of every error rescan raises on purpose."""


class UsageError(RescanError):
    """Bad command-line arguments or configuration."""


class DefinitionsError(RescanError):
    """Rule files missing, unreadable or not compiling."""


class SourceError(RescanError):
    """A mail store that cannot be opened, listed or read."""


class AuthError(SourceError):
    """The store refused the credentials. Never retried."""


class TransientError(SourceError):
    """A failure worth retrying: dropped connection, timeout, server busy."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FetchError(RescanError):
    """One message could not be fetched; the rest of the batch is unaffected."""


class ActionError(RescanError):
    """An action (tag, quarantine, delete) failed; the original message stays where it was."""


class StateError(RescanError):
    """The state store is unusable (corrupt, wrong schema, unwritable)."""


class LockedError(StateError):
    """Another live run holds the lock on the state store."""


class WorkerCrashed(RescanError):
    """The worker process running the task died (a crash in a native library, OOM kill)."""


class TaskTimeout(RescanError):
    """The task ran longer than the pool's task timeout; its worker was killed."""


class InitializerFailed(RescanError):
    """A worker's initializer raised: no task can run."""

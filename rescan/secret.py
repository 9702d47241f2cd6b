"""Secrets that cannot leak by accident: never in repr, str, logs or tracebacks."""

from __future__ import annotations

import os
from pathlib import Path

from rescan.errors import UsageError


class Secret:
    """A password or token. ``str()`` and ``repr()`` show ``***``; ``reveal()`` gives the value
    to the one call that sends it to a server."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        """The secret value. Call it only where the value is handed to a protocol library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a worker process or a report
        raise TypeError("a Secret cannot be pickled")

    @classmethod
    def from_env(cls, name: str) -> Secret | None:
        """The secret in environment variable ``name``, or None when it is unset or empty."""
        value = os.environ.get(name)
        return cls(value) if value else None

    @classmethod
    def from_command(cls, command: str, timeout: float = 60) -> Secret:
        """The first line a command prints (run without a shell, e.g. a token helper).
        Raises UsageError when it fails; its output is never shown."""
        import shlex
        import subprocess

        try:
            done = subprocess.run(shlex.split(command), capture_output=True, timeout=timeout, text=True)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise UsageError(f"token command failed: {type(exc).__name__}") from None
        lines = done.stdout.splitlines()
        if done.returncode != 0 or not lines or not lines[0].strip():
            raise UsageError(f"token command exited {done.returncode} without printing a token")
        return cls(lines[0].strip())

    @classmethod
    def from_file(cls, path: str | Path) -> Secret:
        """The first line of a file. Raises UsageError when it cannot be read."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read password file {path}: {exc.strerror}") from None
        value = text.splitlines()[0] if text else ""
        if not value:
            raise UsageError(f"password file {path} is empty")
        return cls(value)

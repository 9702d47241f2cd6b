"""Settings of a scan, from command-line options or a TOML file (``rescan run --config``).

A TOML file names sources with credentials by reference only (an environment variable or a
file); an inline password is refused. Example::

    state = "/var/lib/rescan/state.sqlite"
    rules = ["/etc/rescan/rules"]
    workers = 4
    action = "report"            # report | tag | quarantine | delete
    max_duration = 3600          # seconds; stop at a batch boundary, the next run continues

    [limits]
    max_message_size = 52428800

    [report]
    format = "json"
    output = "/var/log/rescan/last.json"

    [[source]]
    url = "imaps://scanner@mail.example.com"
    password_env = "RESCAN_IMAP_PASSWORD"
    exclude = ["Trash", "Junk*"]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from connectors.base import SourceOptions
from rescan.errors import UsageError
from rescan.models import Limits
from rescan.secret import Secret

ACTIONS = ("report", "tag", "quarantine", "delete")


@dataclass(frozen=True)
class SourceSettings:
    """One source and how to authenticate to it (secrets by reference only)."""

    url: str
    password_env: str = "RESCAN_PASSWORD"
    password_file: str | None = None
    token_file: str | None = None
    token_command: str | None = None  # prints an OAuth2 access token (run without a shell)
    ca_file: str | None = None
    insecure: bool = False
    connections: int = 4
    mailboxes_file: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def options(self) -> SourceOptions:
        """Resolve references into ``SourceOptions`` (reads the password, token, mailbox list).
        Raises UsageError when a referenced file cannot be read."""
        password = Secret.from_file(self.password_file) if self.password_file else Secret.from_env(self.password_env)
        token = Secret.from_file(self.token_file) if self.token_file else None
        if self.token_command:
            token = Secret.from_command(self.token_command)
        mailboxes: tuple[str, ...] = ()
        if self.mailboxes_file:
            try:
                lines = Path(self.mailboxes_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise UsageError(f"cannot read mailbox list {self.mailboxes_file}: {exc.strerror}") from None
            mailboxes = tuple(x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#"))
        return SourceOptions(
            password=password,
            token=token,
            ca_file=self.ca_file,
            insecure=self.insecure,
            connections=self.connections,
            mailboxes=mailboxes,
            include=self.include,
            exclude=self.exclude,
            extra=dict(self.extra),
        )


@dataclass(frozen=True)
class ScanSettings:
    """Everything one scan needs."""

    sources: tuple[SourceSettings, ...]
    rules: tuple[str, ...] = ()
    clamd: str | None = None
    workers: int | None = None
    limits: Limits = field(default_factory=Limits)
    state: str | None = None
    full: bool = False
    action: str = "report"
    tag_name: str = "$Infected"
    quarantine_folder: str = "Quarantine"
    hard: bool = False
    format: str = "text"
    output: str | None = None
    quiet: bool = False
    archive_passwords: tuple[str, ...] = ("infected",)
    max_duration: float | None = None
    in_flight_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise UsageError(f"--action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if self.format not in ("text", "json"):
            raise UsageError(f"--format must be text or json, not {self.format!r}")
        if self.workers is not None and self.workers < 1:
            raise UsageError("--workers must be at least 1")
        if not self.sources:
            raise UsageError("no source given")


def _table(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise UsageError(f"config: [{key}] must be a table")
    return v


def _known(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UsageError(f"config: unknown key(s) in {where}: {', '.join(unknown)}")


def load_config(path: str | Path) -> ScanSettings:
    """Read a TOML config. Raises UsageError for a missing or invalid file, unknown keys, or
    an inline secret."""
    import tomllib  # only the scheduled job reads a config: plain scans do not pay for it

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from None
    src_fields = {f.name for f in fields(SourceSettings)}
    sources = []
    for i, s in enumerate(data.get("source", [])):
        if "password" in s or "token" in s:
            raise UsageError(f"config: source {i + 1} has an inline secret; use password_env or password_file")
        _known(s, src_fields, f"[[source]] {i + 1}")
        if "url" not in s:
            raise UsageError(f"config: source {i + 1} has no url")
        for k in ("include", "exclude"):
            if k in s:
                s[k] = tuple(s[k])
        sources.append(SourceSettings(**s))
    limits_d = _table(data, "limits")
    _known(limits_d, {f.name for f in fields(Limits)}, "[limits]")
    report_d = _table(data, "report")
    _known(report_d, {"format", "output"}, "[report]")
    top = {"state", "rules", "clamd", "workers", "action", "tag_name", "quarantine_folder", "hard",
           "archive_passwords", "max_duration", "limits", "report", "source"}
    _known(data, top, "the top level")
    base = dict(data)
    for k in ("source", "limits", "report"):
        base.pop(k, None)
    for k in ("rules", "archive_passwords"):
        if k in base:
            base[k] = tuple(base[k])
    return ScanSettings(sources=tuple(sources), limits=replace(Limits(), **limits_d), **report_d, **base)


def with_overrides(settings: ScanSettings, **changes: Any) -> ScanSettings:
    """A copy of ``settings`` with the non-None ``changes`` applied."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})

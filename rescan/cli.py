"""The command line: the one place that wires connectors, definitions, pool, pipeline, state,
actions and reports together.

Commands: ``scan`` (one-off or stamped scan of sources), ``run`` (the scheduled job from a
TOML config), ``rules`` (definitions and what changed), ``status`` (stamp coverage per mailbox).
Exit codes as clamscan: 0 clean, 1 infected, 2 errors (errors win).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from rescan.config import ScanSettings, SourceSettings, load_config, with_overrides
from rescan.definitions import Definitions
from rescan.errors import RescanError, SourceError, UsageError
from rescan.models import Limits
from rescan.report import EXIT_ERROR, Report, now_iso, write_json, write_text
from rescan.pipeline import RunError
from rescan.session import StateSession, previous_components

log = logging.getLogger("rescan")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Re-scan stored mail against updated malware definitions.")


class Progress:
    """A tqdm bar on stderr (messages, bytes, rate, ETA) when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="msg", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self.bytes = 0

    def discovered(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def done(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bytes += nbytes
            self.bar.set_postfix_str(f"{self.bytes / 1e6:.1f} MB", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(settings: ScanSettings, if_definitions_changed: bool = False) -> int:
    """Run one scan as ``settings`` say; write the report; return the exit code."""
    from connectors.base import open_source
    from rescan.pipeline import Pipeline
    from rescan.pool import WorkerPool
    from rescan.scan import init_worker

    definitions = Definitions.build(settings.rules, settings.clamd, settings.limits)
    if if_definitions_changed and previous_components(settings.state) == definitions.components():
        print("rescan: definitions unchanged since the last complete run; nothing to do", file=sys.stderr)
        return 0
    start = now_iso()
    t0 = time.monotonic()
    report = Report(start=start, sources=[s.url for s in settings.sources])
    with contextlib.ExitStack() as stack:
        session = stack.enter_context(StateSession.open(settings, definitions))
        report.definitions = definitions.to_json(session.previous_components)
        connectors = []
        for src in settings.sources:
            try:
                connectors.append(stack.enter_context(open_source(src.url, src.options())))
            except UsageError:
                raise
            except RescanError as exc:
                if len(settings.sources) == 1:
                    raise
                report.errors.append(RunError(src.url, None, None, str(exc)))
                print(f"rescan: error: {exc}", file=sys.stderr)
        if not connectors:
            raise SourceError("no source could be opened")
        pool = WorkerPool(
            settings.workers,
            initializer=init_worker,
            initargs=(definitions.specs, session.cache_path),
            task_timeout=settings.limits.timeout,
            preload=("rescan.scan", "rescan.extract"),
        )
        stack.callback(pool.shutdown, cancel_futures=True)
        progress = Progress(not settings.quiet and sys.stderr.isatty())
        stack.callback(progress.close)
        pipeline = Pipeline(
            connectors,
            pool,
            settings.limits,
            planner=session.planner(),
            in_flight_bytes=settings.in_flight_bytes,
            cache_key_of=session.cache_key_of,
            passwords=settings.archive_passwords,
            on_discovered=progress.discovered,
            ledger=session,
        )
        deadline = t0 + settings.max_duration if settings.max_duration else None
        try:
            for rec in pipeline.run():
                report.add(rec)
                session.add(rec)
                progress.done(rec.verdict.bytes_scanned)
                if deadline and time.monotonic() > deadline and not pipeline.stop.is_set():
                    log.warning("--max-duration reached: stopping at a batch boundary; the next run continues")
                    pipeline.stop.set()
        except KeyboardInterrupt:
            pipeline.stop.set()
            report.complete = False
            print("rescan: interrupted; progress so far is kept", file=sys.stderr)
        report.complete = report.complete and not pipeline.stop.is_set()
        report.errors.extend(pipeline.errors)
        report.summary.mailboxes = len(pipeline.mailboxes)
        report.summary.folders = len(pipeline.folders)
        report.summary.folders_incremental = len(pipeline.incremental)
        report.summary.add_unchanged(pipeline.unchanged)
        if settings.action != "report":
            from rescan.actions import apply_actions

            report.actions = apply_actions(connectors, report.records, settings, session)
        report.end = now_iso()
        report.duration = time.monotonic() - t0
        session.finish(report)
    write_report(report, settings)
    return report.exit_code


def write_report(report: Report, settings: ScanSettings) -> None:
    """Write the report as ``settings.format`` to ``settings.output`` or stdout."""
    writer = write_json if settings.format == "json" else write_text
    if settings.output:
        try:
            with open(settings.output, "w", encoding="utf-8") as out:
                writer(report, out)
        except OSError as exc:
            raise UsageError(f"cannot write report {settings.output}: {exc.strerror}") from None
    else:
        writer(report, sys.stdout)
        sys.stdout.flush()


def _limits(max_message_size, max_filesize, max_scansize, max_files, max_recursion, timeout) -> Limits:
    from dataclasses import replace

    given = dict(
        max_message_size=max_message_size,
        max_filesize=max_filesize,
        max_scansize=max_scansize,
        max_files=max_files,
        max_recursion=max_recursion,
        timeout=timeout,
    )
    return replace(Limits(), **{k: v for k, v in given.items() if v is not None})


def parse_source_options(items: List[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings into a dict. Raises UsageError for an item without ``=`` and for
    keys that would carry a secret (those go through --password-env or --password-file)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--source-option takes KEY=VALUE, not {item!r}")
        if any(word in key.lower() for word in ("password", "secret", "token")):
            raise UsageError(f"--source-option {key}: secrets are not accepted on the command line")
        out[key.strip()] = value.strip()
    return out


@app.command()
def scan(
    sources: List[str] = typer.Argument(..., help="Sources: maildir:PATH, mbox:PATH, eml:PATH, PATH, imap://user@host, imaps://..., ews://user@host/EWS/Exchange.asmx"),
    rules: List[Path] = typer.Option([], "--rules", "-r", help="YARA rule file or directory (repeatable). Default: the bundled rules."),
    clamd: Optional[str] = typer.Option(None, help="clamd address: unix:/path/clamd.sock or tcp://host:port"),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: number of cores)."),
    format: str = typer.Option("text", "--format", "-f", help="Report format: text or json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the report to this file instead of stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    state: Optional[Path] = typer.Option(None, help="State store (SQLite): scan stamps; rescan only what changed."),
    full: bool = typer.Option(False, help="Ignore stamps: scan every message again."),
    action: str = typer.Option("report", help="report (changes nothing), tag, quarantine or delete."),
    tag_name: str = typer.Option("$Infected", help="Keyword (IMAP) or category (EWS) for --action tag."),
    quarantine_folder: str = typer.Option("Quarantine", help="Folder for --action quarantine."),
    hard: bool = typer.Option(False, help="With --action delete: delete for good instead of moving to the trash."),
    password_env: str = typer.Option("RESCAN_PASSWORD", help="Environment variable holding the password."),
    password_file: Optional[Path] = typer.Option(None, help="File whose first line is the password."),
    token_file: Optional[Path] = typer.Option(None, help="File holding an OAuth2 access token."),
    token_command: Optional[str] = typer.Option(None, help="Command printing an OAuth2 access token (run without a shell)."),
    ca_file: Optional[Path] = typer.Option(None, help="CA certificates to verify the server with."),
    insecure: bool = typer.Option(False, help="Do not verify TLS certificates (dangerous)."),
    connections: int = typer.Option(4, help="Parallel connections per source."),
    mailboxes: Optional[Path] = typer.Option(None, help="File listing mailboxes to scan (admin/impersonation logins)."),
    include: List[str] = typer.Option([], help="Folder glob to include (repeatable)."),
    exclude: List[str] = typer.Option([], help="Folder glob to exclude (repeatable)."),
    source_option: List[str] = typer.Option([], "--source-option", "-O", help="Connector setting KEY=VALUE (repeatable), e.g. auth=ntlm, mbox_format=mboxo."),
    max_message_size: Optional[int] = typer.Option(None, help="Skip (and report) messages larger than this many bytes."),
    max_filesize: Optional[int] = typer.Option(None, help="Largest extracted part, bytes."),
    max_scansize: Optional[int] = typer.Option(None, help="Most extracted bytes per message."),
    max_files: Optional[int] = typer.Option(None, help="Most parts per message."),
    max_recursion: Optional[int] = typer.Option(None, help="Deepest container nesting."),
    timeout: Optional[float] = typer.Option(None, help="Seconds per message before its scan is abandoned."),
    max_duration: Optional[float] = typer.Option(None, help="Stop cleanly after this many seconds; the next run continues."),
) -> None:
    """Scan mail stores; list infected and not fully scanned messages."""
    src = tuple(
        SourceSettings(
            url=u,
            password_env=password_env,
            password_file=str(password_file) if password_file else None,
            token_file=str(token_file) if token_file else None,
            token_command=token_command,
            ca_file=str(ca_file) if ca_file else None,
            insecure=insecure,
            connections=connections,
            mailboxes_file=str(mailboxes) if mailboxes else None,
            include=tuple(include),
            exclude=tuple(exclude),
            extra=parse_source_options(source_option),
        )
        for u in sources
    )
    settings = ScanSettings(
        sources=src,
        rules=tuple(str(r) for r in rules),
        clamd=clamd,
        workers=workers,
        limits=_limits(max_message_size, max_filesize, max_scansize, max_files, max_recursion, timeout),
        state=str(state) if state else None,
        full=full,
        action=action,
        tag_name=tag_name,
        quarantine_folder=quarantine_folder,
        hard=hard,
        format=format,
        output=str(output) if output else None,
        quiet=quiet,
        max_duration=max_duration,
    )
    raise typer.Exit(execute(settings))


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config naming sources, rules, state, action, limits."),
    if_definitions_changed: bool = typer.Option(False, help="Exit 0 at once when definitions are unchanged since the last complete run."),
    max_duration: Optional[float] = typer.Option(None, help="Stop cleanly after this many seconds; the next run continues."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="Override the report format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Override the report file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    full: bool = typer.Option(False, help="Ignore stamps: scan every message again."),
) -> None:
    """The scheduled job: scan the sources of a config file, with scan stamps."""
    from rescan.session import default_state_path

    settings = load_config(config)
    settings = with_overrides(
        settings,
        max_duration=max_duration,
        format=format,
        output=str(output) if output else None,
        quiet=quiet or None,
        full=full or None,
        state=settings.state or str(default_state_path()),
    )
    raise typer.Exit(execute(settings, if_definitions_changed=if_definitions_changed))


@app.command()
def rules(
    rules: List[Path] = typer.Option([], "--rules", "-r", help="YARA rule file or directory (repeatable)."),
    clamd: Optional[str] = typer.Option(None, help="clamd address, to include ClamAV's version."),
    state: Optional[Path] = typer.Option(None, help="State store, to show what changed since the last run."),
    format: str = typer.Option("text", "--format", "-f", help="text or json."),
) -> None:
    """Show the definitions version, each rule file with its rule count, and what changed."""
    import json

    definitions = Definitions.build([str(r) for r in rules], clamd)
    info = definitions.to_json(previous_components(state))
    if format == "json":
        print(json.dumps(info, indent=2))
        return
    print(f"Definitions version: {info['version']}")
    for name, desc in info["engines"].items():
        print(f"Engine {name}: " + ", ".join(f"{k} {v}" for k, v in desc.items()))
    for f in info["rule_files"]:
        count = f"{f['rules']} rules" if f["rules"] is not None else f["engine"]
        print(f"  {f['name']}: {count}, {f['fingerprint'][:16]}")
    ch = info["changed_since_last_run"]
    if state:
        for k in ("added", "changed", "removed"):
            for n in ch[k]:
                print(f"{k}: {n}")
        if not any(ch.values()):
            print("unchanged since the last complete run")


@app.command()
def status(
    state: Optional[Path] = typer.Option(None, help="State store (default: the user's state directory)."),
    rules: List[Path] = typer.Option([], "--rules", "-r", help="Rules to compute stamp coverage against (default: those of the last run)."),
    format: str = typer.Option("text", "--format", "-f", help="text or json."),
) -> None:
    """Per source and mailbox: messages known, stamp coverage, infected, last run."""
    from rescan.session import show_status

    show_status(state, [str(r) for r in rules], format)


def main() -> None:
    """Console entry point: runs the app; a RescanError becomes one line on stderr, exit 2."""
    logging.basicConfig(level=logging.WARNING, format="rescan: %(message)s", stream=sys.stderr)
    try:
        app()  # standalone: usage errors print their own message and exit 2
    except RescanError as exc:
        print(f"rescan: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print("rescan: interrupted", file=sys.stderr)
        sys.exit(EXIT_ERROR)

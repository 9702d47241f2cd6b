"""``rescan run --config``: credentials by reference only, --if-definitions-changed, and
--max-duration stopping at a batch boundary with the next run continuing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stampkit import (
    EICAR_RULE, MARKER_RULE, cli_env, maildir, message, put, query, rescan, rules_dir, unique,
)

SECRET = "pw-7f3a9c-not-for-output"


def write_config(path: Path, store: Path, rules: Path, state: Path, source_extra: str = "", top_extra: str = "") -> Path:
    """A config naming one Maildir source, the rules, the state, one worker, JSON reports."""
    path.write_text(
        f'state = "{state}"\n'
        f'rules = ["{rules}"]\n'
        "workers = 1\n"
        f"{top_extra}\n"
        "[report]\n"
        'format = "json"\n\n'
        "[[source]]\n"
        f'url = "maildir:{store}"\n'
        f"{source_extra}\n"
    )
    return path


@pytest.fixture
def setup(tmp_path):
    """A Maildir of 20 messages (2 infected, one marked), eicar-only rules, a config, an env."""
    store = maildir(tmp_path / "mail")
    for i in range(20):
        put(store, i, message(i, infected=i in (3, 8), marked=i == 11))
    rules = rules_dir(tmp_path / "rules", eicar=EICAR_RULE)
    state = tmp_path / "state.sqlite"
    config = write_config(tmp_path / "rescan.toml", store, rules, state)
    return store, rules, state, config, cli_env(tmp_path)


def run(env: dict, config: Path, *args: str):
    """``rescan run --config CONFIG ARGS``; returns the finished process."""
    return rescan(env, "run", "--config", str(config), "-q", *args)


def test_inline_password_is_refused(setup, tmp_path):
    store, rules, state, _, env = setup
    config = write_config(tmp_path / "bad.toml", store, rules, state, f'password = "{SECRET}"')
    p = run(env, config)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "inline secret" in lines[0] and "password_env" in lines[0]
    assert SECRET not in p.stderr
    assert not state.exists()  # refused before anything was opened


def test_credentials_by_reference(setup, tmp_path):
    store, rules, state, _, env = setup
    by_env = write_config(tmp_path / "env.toml", store, rules, state, 'password_env = "RESCAN_TEST_PW"')
    p = run(dict(env, RESCAN_TEST_PW=SECRET), by_env)
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout)["run"]["summary"]["messages_scanned"] == 20

    pw_file = tmp_path / "pw"
    pw_file.write_text(SECRET + "\n")
    by_file = write_config(tmp_path / "file.toml", store, rules, state, f'password_file = "{pw_file}"')
    p = run(env, by_file, "--full")
    assert p.returncode == 1, p.stderr
    assert SECRET not in p.stdout + p.stderr
    assert SECRET.encode() not in state.read_bytes()

    missing = write_config(tmp_path / "missing.toml", store, rules, state, f'password_file = "{tmp_path / "nope"}"')
    p = run(env, missing)
    assert p.returncode == 2 and "cannot read password file" in p.stderr


def test_if_definitions_changed(setup):
    store, rules, state, config, env = setup
    p = run(env, config, "--if-definitions-changed")  # no run yet: scans
    assert p.returncode == 1
    assert json.loads(p.stdout)["run"]["summary"]["messages_scanned"] == 20
    runs = query(state, "SELECT count(*) FROM runs")

    put(store, 50, message(50, infected=True))  # new mail is left for a run without the flag
    p = run(env, config, "--if-definitions-changed")
    assert p.returncode == 0 and p.stdout == ""
    assert "definitions unchanged since the last complete run" in p.stderr
    assert query(state, "SELECT count(*) FROM runs") == runs  # nothing opened, nothing recorded

    rules_dir(rules, extra=MARKER_RULE)
    p = run(env, config, "--if-definitions-changed")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["run"]["definitions"]["changed_since_last_run"]["added"] == ["extra.yar"]
    assert report["run"]["summary"]["messages_scanned"] == 21
    assert [m["id"] for m in report["messages"] if m["new"]] == [unique(11), unique(50)]

    p = run(env, config, "--if-definitions-changed")
    assert p.returncode == 0 and p.stdout == ""


def test_max_duration_stops_at_a_batch_boundary_and_the_next_run_continues(tmp_path):
    total = 1500
    store = maildir(tmp_path / "mail")
    for i in range(total):
        put(store, i, message(i, infected=i % 500 == 7))
    rules = rules_dir(tmp_path / "rules", eicar=EICAR_RULE)
    state = tmp_path / "state.sqlite"
    config = write_config(tmp_path / "rescan.toml", store, rules, state)
    env = cli_env(tmp_path)

    # The deadline has passed when the first record comes back, however fast the machine:
    # the run stops after the batches already in flight, never before its first one.
    p = run(env, config, "--max-duration", "0.001")
    assert p.returncode == 2, p.stderr
    assert "--max-duration reached" in p.stderr
    first = json.loads(p.stdout)["run"]
    assert first["complete"] is False
    s = first["summary"]
    assert 0 < s["messages_scanned"] < total
    assert s["errors"] == 0 and first["errors"] == []  # stopped, not failed
    stored = query(state, "SELECT count(*), sum(status = 'error') FROM messages")[0]
    assert stored == (s["messages_scanned"], 0)  # everything scanned was committed
    assert query(state, "SELECT complete FROM runs") == [(0,)]

    p = run(env, config)
    assert p.returncode == 1, p.stderr
    second = json.loads(p.stdout)["run"]
    assert second["complete"] is True
    assert second["summary"]["messages_scanned"] == total - s["messages_scanned"]
    assert second["summary"]["up_to_date"] == s["messages_scanned"]
    assert second["summary"]["infected"] == 3
    assert query(state, "SELECT count(*) FROM messages") == [(total,)]


def test_example_config_is_valid():
    from rescan.config import load_config
    from tests.stampkit import REPO

    settings = load_config(REPO / "examples" / "rescan.toml")
    assert [s.url for s in settings.sources] == ["maildir:examples/maildir"]
    assert settings.state and settings.rules == ("rescan/rules",) and settings.format == "json"
    assert all(s.password_file is None for s in settings.sources)  # nothing inline, nothing needed

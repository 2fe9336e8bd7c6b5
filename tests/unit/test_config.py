"""Configuration: loading, precedence, secrets, and one clear line for every bad input (G10)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from usersyncd import cli, db, dsn
from usersyncd import config as config_module
from usersyncd.config import load_config
from usersyncd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GOOD = """
[database]
url = "postgresql://usersync@localhost:5432/app"
[api]
url = "https://api.example.com"
key = "k-123"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "usersync.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_example_config_loads_with_documented_defaults() -> None:
    """config.example.toml is valid and its values are the documented defaults."""
    config = load_config(REPO / "config.example.toml", environ={})
    assert config.limits.requests == 50
    assert config.limits.window == 3600.0
    assert config.limits.margin == 36.0
    assert config.limits.batch_size == 1000
    assert config.retry.attempts == 3 and config.retry.backoff == 60.0
    assert config.queue.name == "user-sync" and config.queue.retry_after == 90.0
    assert config.source.table_parts == ("public", "users")
    assert config.http.address == ("127.0.0.1", 9187)
    assert config.source.notify_channel == ""  # polling only, unless the operator opts in


def test_api_rename_defaults_to_new_email_and_takes_none_only(tmp_path: Path) -> None:
    """api.rename: "new_email" by default, "none" allowed, anything else one line (G12)."""
    assert load_config(write(tmp_path, GOOD), environ={}).api.rename == "new_email"
    assert load_config(write(tmp_path, GOOD + 'rename = "none"\n'), environ={}).api.rename == "none"
    with pytest.raises(ConfigError, match=r"^api\.rename: "):
        load_config(write(tmp_path, GOOD + 'rename = "email"\n'), environ={})


def test_margin_defaults_to_one_percent_of_window(tmp_path: Path) -> None:
    """An unset limits.margin is 1 % of limits.window."""
    path = write(tmp_path, GOOD + "[limits]\nwindow = 2.0\n")
    assert load_config(path, environ={}).limits.margin == pytest.approx(0.02)


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    """Precedence: flag > environment > file > default."""
    path = write(tmp_path, GOOD)
    environ = {
        "USER_API_URL": "https://env.example.com",
        "USER_API_KEY": "env-key",
        "USERSYNCD_DATABASE_URL": "postgresql://env@db/app",
    }
    config = load_config(path, environ=environ)
    assert config.api.url == "https://env.example.com"
    assert config.api.key.get_secret_value() == "env-key"
    assert config.database.url == "postgresql://env@db/app"
    flagged = load_config(path, environ=environ, overrides={"database.url": "postgresql://flag@db/x"})
    assert flagged.database.url == "postgresql://flag@db/x"


def test_key_file_is_read_and_never_shown(tmp_path: Path) -> None:
    """api.key_file supplies the key; neither repr nor str of the config shows it (G9)."""
    key_file = tmp_path / "api_key"
    key_file.write_text("file-secret-987\n", encoding="utf-8")
    path = write(
        tmp_path,
        GOOD.replace('key = "k-123"', f'key_file = "{key_file}"'),
    )
    config = load_config(path, environ={})
    assert config.api.require_key() == "file-secret-987"
    assert "file-secret-987" not in repr(config)
    assert "file-secret-987" not in str(config)
    assert "file-secret-987" in config.secrets


def test_key_with_a_trailing_newline_is_stripped(tmp_path: Path) -> None:
    """A key from an environment variable or file with a trailing newline works as the key."""
    config = load_config(write(tmp_path, GOOD), environ={"USER_API_KEY": "env-key\n"})
    assert config.api.require_key() == "env-key"


def test_password_as_a_query_parameter_is_a_secret(tmp_path: Path) -> None:
    """?password= in database.url is redacted like the key."""
    path = write(tmp_path, GOOD.replace("localhost:5432/app", "localhost:5432/app?password=qp-999"))
    assert "qp-999" in load_config(path, environ={}).secrets


def test_database_password_is_a_secret(tmp_path: Path) -> None:
    """A password in database.url is redacted like the key and kept out of repr."""
    path = write(tmp_path, GOOD.replace("usersync@", "usersync:pw-555@"))
    config = load_config(path, environ={})
    assert "pw-555" in config.secrets
    assert "pw-555" not in repr(config)


BAD_CASES = [
    ("unknown key", GOOD + "[limits]\nbatchsize = 10\n", "limits.batchsize", "unknown key"),
    ("unknown section", GOOD + "[limit]\nrequests = 10\n", "limit", "unknown key"),
    ("wrong type", GOOD + '[limits]\nrequests = "many"\n', "limits.requests", "integer"),
    (
        "negative duration",
        GOOD + "[source]\npoll_interval = -1.0\n",
        "source.poll_interval",
        "greater than 0",
    ),
    ("batch too big", GOOD + "[limits]\nbatch_size = 5000\n", "limits.batch_size", "1000"),
    (
        "requests < 1",
        GOOD + "[limits]\nrequests = 0\n",
        "limits.requests",
        "greater than or equal to 1",
    ),
    (
        "missing database url",
        '[api]\nurl = "https://api.example.com"\n',
        "database",
        "required",
    ),
    (
        "both key and key_file",
        GOOD.replace('key = "k-123"', 'key = "k-123"\nkey_file = "/nonexistent"'),
        "api",
        "not both",
    ),
    ("bad auth", GOOD.replace('key = "k-123"', 'key = "k"\nauth = "digest"'), "api.auth", "bearer"),
    (
        "bad start_from",
        GOOD + '[source]\nstart_from = "yesterday"\n',
        "source.start_from",
        "RFC 3339",
    ),
    (
        "notify channel not an identifier",
        GOOD + '[source]\nnotify_channel = "users; DROP TABLE users"\n',
        "source.notify_channel",
        "identifier",
    ),
    ("bad log format", GOOD + '[log]\nformat = "xml"\n', "log.format", "json"),
    ("bad listen", GOOD + '[http]\nlisten = "nowhere"\n', "http.listen", "HOST:PORT"),
    ("no email field", GOOD + '[source]\nfields = { name = "name" }\n', "source.fields", "email"),
    (
        "field both value and parent",
        GOOD + '[source]\nfields = { email = "email", cf = "a", "cf.plan" = "b" }\n',
        "source.fields",
        "both a value and the parent",
    ),
    ("key with a space", GOOD.replace('key = "k-123"', 'key = "k 123"'), "api.key", "printable ASCII"),
]


@pytest.mark.parametrize(("case", "text", "key", "problem"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, text: str, key: str, problem: str
) -> None:
    """Each malformed config: exit 2, one stderr line naming the key and the problem."""
    code, err = run_cli(capsys, "migrate", "--config", str(write(tmp_path, text)))
    assert code == 2, case
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and problem in lines[0], lines[0]
    assert "k-123" not in err


def test_invalid_toml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TOML syntax error: exit 2, one line with the file and the line number."""
    path = write(tmp_path, GOOD + "[limits]\nrequests = = 3\n")
    code, err = run_cli(capsys, "migrate", "--config", str(path))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(path) in err and "line 8" in err


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that cannot be read: exit 2, one line naming the file."""
    missing = tmp_path / "nope.toml"
    code, err = run_cli(capsys, "migrate", "--config", str(missing))
    assert code == 2
    assert str(missing) in err and "cannot read" in err and "Traceback" not in err


def test_unreadable_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A key_file that does not exist: exit 2, the line names api.key_file."""
    path = write(tmp_path, GOOD.replace('key = "k-123"', 'key_file = "/nonexistent/key"'))
    code, err = run_cli(capsys, "migrate", "--config", str(path))
    assert code == 2
    assert "api.key_file" in err and "/nonexistent/key" in err and "Traceback" not in err


def test_bad_set_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--set with a value of the wrong type is a config error naming the key."""
    path = write(tmp_path, GOOD)
    code, err = run_cli(capsys, "migrate", "--config", str(path), "--set", "limits.window=-3")
    assert code == 2
    assert "limits.window" in err and "Traceback" not in err


def test_console_script_reports_config_error_without_traceback(tmp_path: Path) -> None:
    """The installed entry point (python -m usersyncd) exits 2 with one line on bad config."""
    path = write(tmp_path, GOOD + "[limits]\nbatch_size = 1001\n")
    result = subprocess.run(
        [sys.executable, "-m", "usersyncd", "migrate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "limits.batch_size" in result.stderr


def test_help_works() -> None:
    """`usersyncd --help` and `usersyncd migrate --help` print usage and exit 0."""
    for argv in (["--help"], ["migrate", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "usersyncd", *argv], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0
        assert "usage: usersyncd" in result.stdout


# --- items 9 and 10 of issue 7: secrets and bounds, each one line and exit 2 from the CLI ----

UNREACHABLE = "postgresql://usersync@127.0.0.1:9/app"  # nothing listens: the old code exits 1
PASSWORD = "Pw-777"
CLEAN = GOOD.replace("postgresql://usersync@localhost:5432/app", UNREACHABLE)


def with_db_url(url: str) -> str:
    return CLEAN.replace(UNREACHABLE, url)


def with_api_url(url: str) -> str:
    return CLEAN.replace("https://api.example.com", url)


CLI_CASES = [
    # (case, config text, extra args, key named, problem named)
    (
        "password with /",
        with_db_url(f"postgresql://usersync:{PASSWORD}/x@127.0.0.1:9/app"),
        [],
        "database.url",
        "percent-encode",
    ),
    (
        "password with @",
        with_db_url(f"postgresql://usersync:{PASSWORD}@x@127.0.0.1:9/app"),
        [],
        "database.url",
        "percent-encode",
    ),
    (
        "password with ?",
        with_db_url(f"postgresql://usersync:{PASSWORD}?x@127.0.0.1:9/app"),
        [],
        "database.url",
        "percent-encode",
    ),
    (
        "port not a number",
        with_db_url(f"postgresql://usersync:{PASSWORD}@127.0.0.1:notaport/app"),
        [],
        "database.url",
        "port",
    ),
    (
        "URL missing its @: the password where the port goes",
        with_db_url(f"postgresql://usersync:{PASSWORD}/app"),
        [],
        "database.url",
        "port",
    ),
    (
        "unclosed IPv6 bracket",
        with_db_url(f"postgresql://usersync:{PASSWORD}@[::1/app"),
        [],
        "database.url",
        "[",
    ),
    (
        "sslmode=bogus",
        with_db_url(f"postgresql://usersync:{PASSWORD}@127.0.0.1:9/app?sslmode=bogus"),
        [],
        "database.url",
        "sslmode",
    ),
    (
        "malformed query",
        with_db_url(f"postgresql://usersync@127.0.0.1:9/app?password={PASSWORD}&&x"),
        [],
        "database.url",
        "query",
    ),
    (
        "bad URL from --database-url",
        CLEAN,
        ["--database-url", f"postgresql://usersync:{PASSWORD}/x@127.0.0.1:9/app"],
        "database.url",
        "percent-encode",
    ),
    (
        "credentials in api.url",
        with_api_url(f"https://user:{PASSWORD}@api.example.com"),
        [],
        "api.url",
        "credentials",
    ),
    (
        "query string in api.url",
        with_api_url(f"https://api.example.com/v2?api_key={PASSWORD}"),
        [],
        "api.url",
        "query string",
    ),
    (
        "malformed --set never echoes its value",
        CLEAN,
        ["--set", f"apikey={PASSWORD}"],
        "--set",
        "SECTION.KEY=VALUE",
    ),
    (
        "--set without =",
        CLEAN,
        ["--set", PASSWORD],
        "--set",
        "SECTION.KEY=VALUE",
    ),
    ("limits.window = inf", CLEAN + "[limits]\nwindow = inf\n", [], "limits.window", "finite"),
    ("limits.window = nan", CLEAN + "[limits]\nwindow = nan\n", [], "limits.window", "finite"),
    (
        "retention_days = 1e300",
        CLEAN.replace("[api]", "retention_days = 1e300\n[api]"),
        [],
        "database.retention_days",
        "at most",
    ),
    ("retry_after = 1e300", CLEAN + "[queue]\nretry_after = 1e300\n", [], "queue.retry_after", "at most"),
    (
        "NUL in state_schema",
        CLEAN.replace("[api]", 'state_schema = "a\\u0000b"\n[api]'),
        [],
        "database.state_schema",
        "NUL",
    ),
]


@pytest.mark.parametrize(("case", "text", "args", "key", "problem"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_check_rejects_with_one_line_and_exit_2(
    tmp_path: Path, case: str, text: str, args: list[str], key: str, problem: str
) -> None:
    """`usersyncd check` (the real process): exit 2, one stderr line naming the key and the
    problem, no traceback, and never the password (G9, G10)."""
    result = subprocess.run(
        [sys.executable, "-m", "usersyncd", "check", "--config", str(write(tmp_path, text)), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, (case, output)
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and not result.stdout, output
    assert key in lines[0] and problem in lines[0], lines[0]
    assert PASSWORD not in output and "k-123" not in output


NUMERIC_CASES = [
    (section, name, value)
    for section, name, zero_is_bad in [
        ("database", "retention_days", True),
        ("source", "poll_interval", True),
        ("source", "lookback", False),
        ("api", "timeout", True),
        ("limits", "window", True),
        ("limits", "margin", False),
        ("retry", "backoff", False),
        ("queue", "retry_after", True),
        ("queue", "shutdown_grace", False),
    ]
    for value in (float("inf"), float("-inf"), float("nan"), 1e300, -1.0, *([0.0] if zero_is_bad else []))
] + [
    ("limits", "requests", 0),
    ("limits", "requests", 10**12),
    ("limits", "batch_size", 0),
    ("retry", "attempts", 0),
    ("queue", "concurrency", 0),
]


@pytest.mark.parametrize(("section", "name", "value"), NUMERIC_CASES)
def test_every_numeric_key_is_bounded(section: str, name: str, value: float) -> None:
    """Durations are finite and at most ten years (zero only where it means "off"); counts are at
    least 1: NaN, infinities, huge, negative and zero values are config errors naming the key."""
    base = {"database.url": UNREACHABLE, "api.url": "https://api.example.com"}
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}: "):
        load_config(None, environ={}, overrides={**base, f"{section}.{name}": value})


def test_durations_up_to_ten_years_are_accepted() -> None:
    """The bound leaves every sane setting alone."""
    ten_years = 10 * 365 * 86400.0
    config = load_config(
        None,
        environ={},
        overrides={
            "database.url": UNREACHABLE,
            "api.url": "https://api.example.com",
            "limits.window": ten_years,
            "queue.retry_after": ten_years,
            "database.retention_days": 3650,
        },
    )
    assert config.limits.window == ten_years


@pytest.mark.parametrize(
    ("url", "passwords"),
    [
        ("postgresql://u:pa/ss@h:5432/db", ["pa/ss"]),
        ("postgresql://u:p@ss@h/db", ["p@ss"]),
        ("postgresql://u:p?ss@h/db?sslmode=require", ["p?ss"]),
        ("postgresql://u:p%2Fss@h/db", ["p%2Fss", "p/ss"]),
        ("postgresql://u:pw@h/db?password=qp&sslpassword=sp", ["pw", "qp", "sp"]),
        ("postgresql://h/db?user=a@b", []),
        ("postgresql://postgres:@/test?host=/tmp/x", []),
    ],
)
def test_database_passwords_are_found_however_the_url_is_written(url: str, passwords: list[str]) -> None:
    """The user information ends at the last '@' before the query: the password is a secret
    even in a URL that does not parse, and redact_dsn hides it."""
    assert dsn.passwords(url) == passwords
    redacted = db.redact_dsn(url)
    assert all(password not in redacted for password in passwords), redacted
    assert redacted.startswith("postgresql://")


def test_redact_dsn_inside_a_message() -> None:
    """A driver message quoting the URL has the password masked, wherever the URL stands."""
    message = "cannot connect to postgresql://u:pa/ss@h/db: refused; password=abc"
    assert db.redact_dsn(message) == "cannot connect to postgresql://u:***@h/db: refused; password=***"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://usersync@localhost:5432/app",
        "postgres://u:p%40ss%2F@db.internal/app?sslmode=verify-full&application_name=x",
        "postgresql://postgres:@/test?host=/tmp/usersyncd-pg-x/sock",
        "postgresql://u@[::1]:5432,h2:5433/app?target_session_attrs=read-write",
        "postgresql:///app",
    ],
)
def test_well_formed_database_urls_pass(url: str) -> None:
    assert dsn.problem(url) is None


def test_url_credentials_are_kept_out_of_every_message(tmp_path: Path) -> None:
    """A database password is a secret from the start, percent-decoded too."""
    config = load_config(
        None,
        environ={},
        overrides={"database.url": "postgresql://u:p%2Fss-1@h/db", "api.url": "https://api.example.com"},
    )
    assert {"p%2Fss-1", "p/ss-1"} <= set(config.secrets)


def test_a_numeric_key_from_set_stays_a_string() -> None:
    """`--set api.key=12345678` is the key "12345678", not a TOML integer (and not an error
    line about an integer that names nothing)."""
    assert config_module.parse_assignment("api.key=12345678") == ("api.key", "12345678")


def test_startup_warnings(tmp_path: Path) -> None:
    """A short key, http:// off this machine, http.listen off loopback: one warning each (SPEC §5:
    warnings, not errors)."""
    config = load_config(
        None,
        environ={},
        overrides={
            "database.url": UNREACHABLE,
            "api.url": "http://api.example.com",
            "api.key": "k",
            "http.listen": "0.0.0.0:9187",
            "limits.window": 2.0,
        },
    )
    warnings = config.warnings()
    assert len(warnings) == 3
    assert any("api.key is only 1 character" in w for w in warnings)
    assert any("http://" in w for w in warnings)
    assert any("http.listen 0.0.0.0:9187" in w for w in warnings)
    # api.timeout above limits.margin is no warning any more: a request with no answer holds its
    # slot until its deadline (test_quota.py), so G1 does not rest on the margin covering it
    quiet = load_config(
        None,
        environ={},
        overrides={"database.url": UNREACHABLE, "api.url": "http://127.0.0.1:8080", "api.key": "k-12345678"},
    )
    assert quiet.warnings() == []


def test_check_warns_about_secrets_on_the_command_line(tmp_path: Path) -> None:
    """`--set api.key=…` and a password in `--database-url` are readable by every local user in
    `ps`: a warning at start, never showing the secret; the short key gets its warning too."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "usersyncd",
            "check",
            "--config",
            str(write(tmp_path, CLEAN)),
            "--set",
            "api.key=kk",
            "--database-url",
            f"postgresql://usersync:{PASSWORD}@127.0.0.1:9/app",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    warnings = [
        json.loads(line)["message"]
        for line in result.stderr.splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "WARNING"
    ]
    assert any(w.startswith("--set api.key puts a secret on the command line") for w in warnings), warnings
    assert any(w.startswith("--database-url puts a secret on the command line") for w in warnings)
    assert any("api.key is only 2 characters" in w for w in warnings)
    output = result.stdout + result.stderr
    assert PASSWORD not in output
    assert '"kk"' not in output and " kk " not in output


def test_run_with_an_unparsable_database_url_is_a_config_error(tmp_path: Path) -> None:
    """`usersyncd run` with an unencoded '/' in the password: exit 2 and one line, not a first
    log line quoting the password and a traceback with exit 1."""
    text = with_db_url(f"postgresql://usersync:{PASSWORD}/x@127.0.0.1:9/app")
    result = subprocess.run(
        [sys.executable, "-m", "usersyncd", "run", "--config", str(write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "usersyncd: config error: database.url: the password holds an unencoded '@', '/', '?' or '#':"
        " percent-encode it (@ as %40, / as %2F, ? as %3F, # as %23)"
    ]

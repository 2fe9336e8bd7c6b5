"""Configuration: loading, precedence, secrets, and one clear line for every bad input (G10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from usersyncd import cli
from usersyncd.config import load_config

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

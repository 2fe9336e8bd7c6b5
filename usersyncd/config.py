"""Configuration (SPEC §5): pydantic models, TOML loading, environment and flag overrides.

Precedence: command-line flag > environment > file > default. Every problem becomes one
`ConfigError` line naming the key, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import usersyncd
from usersyncd import dsn
from usersyncd.errors import ConfigError

# The names operators already use (ORIGIN.md), then ours.
ENV_OVERRIDES = {
    "USER_API_URL": "api.url",
    "USER_API_KEY": "api.key",
    "USERSYNCD_DATABASE_URL": "database.url",
}

MAX_BATCH_SIZE = 1000  # subscribers per request, the API's hard limit
# Ten years: far beyond any sane duration, far inside what a timestamp or an interval can hold
# (1e300 s passed validation and crashed `run` with DatetimeFieldOverflowError).
MAX_SECONDS = 10 * 365 * 86400
MAX_DAYS = 10 * 365
MAX_REQUESTS = 1_000_000  # per window; the poller reads 2 x requests x batch_size rows ahead
SHORT_KEY = 8  # an API key shorter than this is unusual (and redacted only as a whole word)
SECRET_SETTINGS = ("api.key", "database.url", "api.url")  # never read as TOML numbers or echoed


def _at_most(limit: float, unit: str) -> Any:
    def check(value: float) -> float:
        if value > limit:
            raise ValueError(f"must be at most {limit:,.0f} {unit} (10 years)")
        return value

    return AfterValidator(check)


# Durations: finite (TOML has inf and nan) and at most ten years.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False), _at_most(MAX_SECONDS, "seconds")]
SecondsOrZero = Annotated[float, Field(ge=0, allow_inf_nan=False), _at_most(MAX_SECONDS, "seconds")]


def _nul_free(value: Any) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str | Path):
        return "\x00" not in str(value)
    if isinstance(value, dict):
        return all(_nul_free(key) and _nul_free(item) for key, item in value.items())
    return True


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL cannot hold a NUL in a name or a text parameter
        if not _nul_free(value):
            raise ValueError("must not contain a NUL character")
        return value


class DatabaseConfig(_Section):
    url: str = Field(min_length=1, repr=False)  # may hold a password
    state_schema: str = Field(default="usersync", min_length=1)
    retention_days: Annotated[float, Field(gt=0, allow_inf_nan=False), _at_most(MAX_DAYS, "days")] = 7

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: str) -> str:
        # the message never quotes the URL: it may hold the password
        problem = dsn.problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @field_validator("state_schema")
    @classmethod
    def _schema_name(cls, name: str) -> str:
        if len(name.encode()) > 63:  # PostgreSQL would cut a longer name silently
            raise ValueError("must be at most 63 bytes")
        return name


class SourceConfig(_Section):
    table: str = Field(default="public.users", min_length=1)
    id_column: str = Field(default="id", min_length=1)
    updated_at_column: str = Field(default="updated_at", min_length=1)
    fields: dict[str, str] = Field(
        default_factory=lambda: {"email": "email", "name": "name", "time_zone": "time_zone"}
    )
    filter: str = ""
    poll_interval: Seconds = 5.0
    lookback: SecondsOrZero = 60.0
    start_from: str = "beginning"
    on_delete: Literal["ignore", "unsubscribe"] = (
        "ignore"  # a user whose row is deleted or filtered out (G12)
    )
    reconcile_every: SecondsOrZero = 3600.0  # seconds between passes that find deleted rows; 0: off
    notify_channel: str = ""  # LISTEN here and poll at once when notified; "" = polling only

    @field_validator("fields")
    @classmethod
    def _fields(cls, fields: dict[str, str]) -> dict[str, str]:
        if "email" not in fields:
            raise ValueError("must map the API field 'email' to a column")
        for api_field, column in fields.items():
            if not column:
                raise ValueError(f"API field {api_field!r} maps to an empty column name")
            if any(not part for part in api_field.split(".")):
                raise ValueError(f"API field {api_field!r} has an empty part")
        names = set(fields)
        for api_field in fields:
            parent = api_field.rpartition(".")[0]
            while parent:
                if parent in names:
                    raise ValueError(
                        f"API field {parent!r} cannot be both a value and the parent of {api_field!r}"
                    )
                parent = parent.rpartition(".")[0]
        return fields

    @field_validator("start_from")
    @classmethod
    def _start_from(cls, value: str) -> str:
        if value in ("beginning", "now"):
            return value
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError('must be "beginning", "now" or an RFC 3339 time') from None
        if moment.tzinfo is None:
            raise ValueError("an RFC 3339 time needs a UTC offset, e.g. 2026-01-01T00:00:00Z")
        return value

    @field_validator("notify_channel")
    @classmethod
    def _notify_channel(cls, value: str) -> str:
        # a plain identifier: the same name in LISTEN, pg_notify() and the printed trigger SQL
        if value and not re.fullmatch(r"[a-z_][a-z0-9_]*", value):
            raise ValueError("must be a lower-case SQL identifier (letters, digits, _), e.g. usersyncd_users")
        if len(value) > 63:  # PostgreSQL would cut a longer name silently
            raise ValueError("must be at most 63 characters")
        return value

    @property
    def table_parts(self) -> tuple[str, str]:
        """(schema, table); an unqualified name lives in `public`."""
        schema, dot, table = self.table.partition(".")
        return (schema, table) if dot else ("public", schema)

    def start_moment(self) -> datetime | None:
        """The RFC 3339 `start_from`, or None for "beginning" / "now"."""
        if self.start_from in ("beginning", "now"):
            return None
        return datetime.fromisoformat(self.start_from)


_AUTH = re.compile(r"^(bearer|basic|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+)$")


_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9._~-]*$")  # one URL path segment, nothing to escape
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class ApiConfig(_Section):
    url: str = Field(min_length=1)
    key: SecretStr = SecretStr("")
    key_file: Path | None = None
    account_id: str = ""  # replaces {account_id} in the paths (Drip: the account number)
    batch_path: str = "/subscribers/batches"
    probe_path: str = ""  # a GET outside the batch quota: `check --api` (Drip: /v2/accounts/{account_id})
    unsubscribe_path: str = (
        ""  # source.on_delete = "unsubscribe" (Drip: /v2/{account_id}/unsubscribes/batches)
    )
    user_agent: str = ""  # default "usersyncd/VERSION"
    # how an email changed in the table reaches the API (G12): "new_email" renames the subscriber
    # the API holds under the old one; "none" sends the new email as it is (a new subscriber)
    rename: Literal["new_email", "none"] = "new_email"
    auth: str = "bearer"
    timeout: Seconds = 30.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        # no message quotes the URL: what is wrong with it may be a credential
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError("must be an http:// or https:// URL")
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            raise ValueError(
                "credentials in the URL are not supported (they would show in status and logs):"
                ' put the key in api.key or api.key_file, with api.auth = "basic" for HTTP basic'
            )
        if "?" in url or "#" in url:
            raise ValueError(
                "a query string is not supported (the batch path would be appended to it);"
                " put credentials in api.key or api.key_file"
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        return url.rstrip("/")

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @field_validator("batch_path", "probe_path", "unsubscribe_path")
    @classmethod
    def _path(cls, path: str, info: ValidationInfo) -> str:
        if info.field_name == "batch_path" and not path.startswith("/"):
            raise ValueError("must start with '/'")
        if path and not path.startswith("/"):
            raise ValueError("must start with '/' (or be empty: none)")
        for placeholder in _PLACEHOLDER.findall(path):
            if placeholder != "account_id":
                raise ValueError(f"unknown placeholder {{{placeholder}}} (only {{account_id}})")
            if not info.data.get("account_id"):
                raise ValueError("uses {account_id} but api.account_id is not set")
        return path

    @field_validator("account_id", mode="before")
    @classmethod
    def _account_number(cls, account_id: Any) -> Any:
        # Drip's account ids are numbers: `account_id = 9999999` is as good as a string
        return str(account_id) if type(account_id) is int else account_id

    @field_validator("account_id")
    @classmethod
    def _account_id(cls, account_id: str) -> str:
        if not _ACCOUNT_ID.match(account_id):
            raise ValueError(
                "must be letters, digits, '.', '_', '~' or '-' (it becomes part of the URL path)"
            )
        return account_id

    @field_validator("user_agent")
    @classmethod
    def _user_agent(cls, agent: str) -> str:
        if any(not 32 <= ord(char) <= 126 for char in agent):
            raise ValueError("must be printable ASCII on one line")
        return agent.strip()

    @field_validator("auth")
    @classmethod
    def _auth(cls, auth: str) -> str:
        if not _AUTH.match(auth):
            raise ValueError('must be "bearer", "basic" or "header:NAME"')
        return auth

    @field_validator("key", mode="before")
    @classmethod
    def _printable_key(cls, key: Any) -> Any:
        value = key.get_secret_value() if isinstance(key, SecretStr) else key
        if isinstance(value, str):
            value = value.strip()  # a trailing newline from a file or a secret store
            if any(not 33 <= ord(char) <= 126 for char in value):
                # never echo the key: it would land in the error line
                raise ValueError("must be printable ASCII without spaces or line breaks")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> ApiConfig:
        if self.key.get_secret_value() and self.key_file is not None:
            raise ValueError("set either api.key or api.key_file, not both")
        return self

    def resolve(self, path: str) -> str:
        """A configured path with `{account_id}` replaced."""
        return path.replace("{account_id}", self.account_id)

    @property
    def agent(self) -> str:
        """The User-Agent every request sends."""
        return self.user_agent or f"usersyncd/{usersyncd.__version__}"

    def require_key(self) -> str:
        """The API key, or a ConfigError saying where to put it."""
        key = self.key.get_secret_value()
        if not key:
            raise ConfigError("api.key: required to talk to the API (or api.key_file, or USER_API_KEY)")
        return key


class LimitsConfig(_Section):
    batch_size: int = Field(default=MAX_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    requests: int = Field(default=50, ge=1, le=MAX_REQUESTS)
    window: Seconds = 3600.0
    margin: SecondsOrZero | None = None  # default: 1 % of the window
    isolate_share: float = Field(default=0.1, gt=0.0, le=1.0)  # of each span's quota, for isolating culprits

    @model_validator(mode="after")
    def _default_margin(self) -> LimitsConfig:
        if self.margin is None:
            object.__setattr__(self, "margin", self.window * 0.01)
        return self

    @property
    def span(self) -> float:
        """Seconds that must separate a request from the one `requests` places after it."""
        assert self.margin is not None
        return self.window + self.margin


class RetryConfig(_Section):
    attempts: int = Field(default=3, ge=1, le=100)
    backoff: SecondsOrZero = 60.0
    redrive_after: SecondsOrZero = 3600.0  # G13: exhausted users go back to the queue after this; 0: never
    redrives: int = Field(default=3, ge=0, le=100)  # at most this many times per user
    config_errors: int = Field(default=3, ge=1, le=1000)  # same whole-batch refusal in a row: configuration


class QueueConfig(_Section):
    name: str = Field(default="user-sync", min_length=1)
    concurrency: int = Field(default=4, ge=1, le=64)
    retry_after: Seconds = 90.0
    shutdown_grace: SecondsOrZero = 30.0


class LogConfig(_Section):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["json", "text"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: Any) -> Any:
        return level.upper() if isinstance(level, str) else level


class HttpConfig(_Section):
    listen: str = "127.0.0.1:9187"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        if listen == "":
            return listen
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError('must be "HOST:PORT" or "" (off)')
        return listen

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Config(_Section):
    database: DatabaseConfig
    source: SourceConfig = SourceConfig()
    api: ApiConfig
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    queue: QueueConfig = QueueConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()

    @model_validator(mode="after")
    def _unsubscribe_path(self) -> Config:
        if self.source.on_delete == "unsubscribe" and not self.api.unsubscribe_path:
            raise ValueError(
                'api.unsubscribe_path: required by source.on_delete = "unsubscribe"'
                ' (Drip: "/v2/{account_id}/unsubscribes/batches")'
            )
        return self

    @property
    def secrets(self) -> list[str]:
        """Values that must never appear in output (G9): the key, every database password."""
        found = [self.api.key.get_secret_value(), *dsn.passwords(self.database.url)]
        return [secret for secret in found if secret]

    def warnings(self) -> list[str]:
        """Settings that work but deserve a line at start, one line each."""
        found = []
        key = self.api.key.get_secret_value()
        if key and len(key) < SHORT_KEY:
            found.append(
                f"api.key is only {len(key)} character{'s' if len(key) > 1 else ''}, unusual for an API key;"
                " logs redact a key that short only where it stands as a whole word"
            )
        if self.api.url.startswith("http://") and not is_loopback(self.api.host):
            found.append(
                "api.url uses http:// to a host off this machine: the API key and every"
                " subscriber travel unencrypted; use https://"
            )
        if self.http.listen and not is_loopback(self.http.host):
            found.append(
                f"http.listen {self.http.listen} is reachable from other machines:"
                " /metrics and /readyz have no authentication"
            )
        return found


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    path: str | Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration; raise ConfigError with one line."""
    data: dict[str, Any] = _read_toml(Path(path)) if path is not None else {}
    environ = os.environ if environ is None else environ
    for variable, dotted in ENV_OVERRIDES.items():
        if environ.get(variable):
            _set_dotted(data, dotted, environ[variable])
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    api = data.get("api")
    if isinstance(api, dict) and environ.get("USER_API_KEY"):
        api.pop("key_file", None)  # the environment's key wins over the file's key_file
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_problem(exc)) from None
    if config.api.key_file is not None:
        config = config.model_copy(
            update={"api": config.api.model_copy(update={"key": _read_key(config.api.key_file)})}
        )
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _read_key(path: Path) -> SecretStr:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise ConfigError(f"api.key_file: cannot read {path}: {reason}") from None
    if not key:
        raise ConfigError(f"api.key_file: {path} is empty")
    if any(not 33 <= ord(char) <= 126 for char in key):
        raise ConfigError(f"api.key_file: {path} must hold printable ASCII without spaces or line breaks")
    return SecretStr(key)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = data
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{section}: must be a table, to set {dotted}")
        node = child
    node[key] = value


def _first_problem(exc: ValidationError) -> str:
    """One line: the dotted key and what is wrong with it (never the value of a secret)."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "config"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"] and re.match(r"[a-z_]+\.[a-z_]+: ", message):  # a check across sections names its key
        key, message = message.split(": ", 1)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    count = exc.error_count()
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{key}: {message}{more}"


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """`section.key=value` from `--set`; the value is read as TOML, else taken as a string.
    An error names the key only: the value may be a secret."""
    dotted, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError("--set: expected SECTION.KEY=VALUE (no '=' in the argument; not shown)")
    dotted = dotted.strip()
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", dotted):
        raise ConfigError(f"--set: expected SECTION.KEY=VALUE, not a key {dotted[:40]!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if dotted in SECRET_SETTINGS and not isinstance(value, str):
        value = raw  # a numeric key is still a string
    return dotted, value

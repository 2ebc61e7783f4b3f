"""Settings come from the environment and fail loudly on bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ["PATH"],
        "RELAIS_DATA_DIR": str(tmp_path / "data"),
        "DJANGO_SETTINGS_MODULE": "broker.settings",
        **env,
    }
    code = (
        "import django; django.setup(); from django.conf import settings; "
        "print(settings.DATABASES['default']['ENGINE'], settings.DEBUG)"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_defaults_are_sqlite_in_the_data_dir_debug_off_and_secrets_generated(tmp_path):
    result = load_settings(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", "False"]
    secret = tmp_path / "data" / "secret_key"
    assert len(secret.read_text()) >= 50
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    current = (tmp_path / "data" / "signing-keys" / "current").read_text().strip()
    assert (
        (tmp_path / "data" / "signing-keys" / f"{current}.pem")
        .read_bytes()
        .startswith(b"-----BEGIN PRIVATE KEY")
    )


def test_the_generated_secret_key_is_kept_across_starts(tmp_path):
    load_settings(tmp_path)
    first = (tmp_path / "data" / "secret_key").read_text()
    load_settings(tmp_path)
    assert (tmp_path / "data" / "secret_key").read_text() == first


def test_a_bad_boolean_stops_the_start_with_its_name(tmp_path):
    result = load_settings(tmp_path, DEBUG="maybe")
    assert result.returncode != 0
    assert "DEBUG" in result.stderr


def test_a_bad_port_stops_the_start(tmp_path):
    result = load_settings(tmp_path, RELAIS_DICOM_PORT="70000")
    assert result.returncode != 0
    assert "RELAIS_DICOM_PORT" in result.stderr


def test_an_unsupported_database_is_refused(tmp_path):
    result = load_settings(tmp_path, DATABASE_URL="mysql://root@127.0.0.1/test")
    assert result.returncode != 0
    assert "PostgreSQL or SQLite" in result.stderr


def test_postgres_urls_are_understood(tmp_path):
    result = load_settings(tmp_path, DATABASE_URL="postgres://postgres@127.0.0.1:5432/test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "django.db.backends.postgresql"

"""Secrets generated on first run into the data directory, never committed.

Several processes may start at once on a fresh data directory (web server,
DICOM server, a management command): each file is created with O_EXCL, so
the first complete file wins (a hard link that fails if the file exists) and every
other process reads what that one wrote.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def _create_once(path: Path, content: bytes) -> bytes:
    """Write ``path`` unless it exists; return what it holds (ours, or the first writer's).

    The content goes to a private temporary file that is then hard-linked to ``path``:
    the link fails if ``path`` exists, so the first complete file wins and is never
    overwritten, and nobody ever reads a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o600)
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return path.read_bytes()
        return content
    finally:
        os.unlink(tmp_name)


def load_or_create_secret_key(data_dir: Path) -> str:
    """Django's SECRET_KEY, kept in ``<data_dir>/secret_key``."""
    path = data_dir / "secret_key"
    if path.exists():
        value = path.read_text().strip()
    else:
        value = _create_once(path, secrets.token_urlsafe(64).encode()).decode().strip()
    if len(value) < 50:
        raise RuntimeError(f"{path} holds a secret key shorter than 50 characters")
    return value


def load_or_create_signing_key(data_dir: Path) -> Path:
    """The broker's current Ed25519 signing key (PEM, PKCS#8), for tokens and audit checkpoints.

    Keys live in ``<data_dir>/signing-keys/<kid>.pem``; ``current`` names the active kid.
    Returns the path of the active key.
    """
    keys_dir = data_dir / "signing-keys"
    current = keys_dir / "current"
    if not current.exists():
        kid = time.strftime("%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(4)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_once(keys_dir / f"{kid}.pem", pem)
        _create_once(current, kid.encode())
    kid = current.read_text().strip()
    path = keys_dir / f"{kid}.pem"
    if not path.exists():
        raise RuntimeError(f"{current} names key {kid!r} but {path} is missing")
    return path


def load_or_create_evidence_key(data_dir: Path) -> Path:
    """The AES-256-GCM key that encrypts consent evidence at rest: ``<data_dir>/evidence.key``
    (32 random bytes). Returns its path; the key is read when evidence is stored or read."""
    path = data_dir / "evidence.key"
    if not path.exists():
        _create_once(path, secrets.token_bytes(32))
    if len(path.read_bytes()) != 32:
        raise RuntimeError(f"{path} does not hold a 32-byte key")
    return path


@dataclass(frozen=True)
class StoredKey:
    kid: str
    path: Path
    retired_at: float | None  # epoch seconds the key stopped being current, None if current


def signing_keys(data_dir: Path) -> list[StoredKey]:
    """Every signing key in ``<data_dir>/signing-keys``, the current one first."""
    load_or_create_signing_key(data_dir)
    keys_dir = data_dir / "signing-keys"
    current = (keys_dir / "current").read_text().strip()
    keys = []
    for path in sorted(keys_dir.glob("*.pem")):
        retired = path.with_suffix(".retired")
        retired_at = None if path.stem == current else _retired_at(retired, path)
        keys.append(StoredKey(path.stem, path, retired_at))
    return sorted(keys, key=lambda k: (k.retired_at is not None, -(k.retired_at or 0), k.kid))


def signing_key_rotate(data_dir: Path) -> str:
    """A new current signing key; the previous one is marked retired now (it still
    verifies the tokens it signed until they expire). Returns the new kid."""
    keys_dir = data_dir / "signing-keys"
    load_or_create_signing_key(data_dir)
    previous = (keys_dir / "current").read_text().strip()
    kid = time.strftime("%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(4)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create_once(keys_dir / f"{kid}.pem", pem)
    _create_once(keys_dir / f"{previous}.retired", str(time.time()).encode())
    # Switch `current` atomically: readers see the old kid or the new one, never half.
    fd, tmp_name = tempfile.mkstemp(dir=keys_dir, prefix=".current.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(kid.encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_name, keys_dir / "current")
    return kid


def _retired_at(marker: Path, key: Path) -> float:
    try:
        return float(marker.read_text().strip())
    except (OSError, ValueError):
        return key.stat().st_mtime  # retired before markers existed: as old as the key

"""A real OHIF viewer (v3, the published build of ``@ohif/app``) for the tests, and Debian's
Chromium to run it.

The build is fetched once, before the tests (``make ohif``, which ``make test`` runs:
``python -m tests.peers.ohif``), from the npm registry: the tarball of a pinned version,
checked against the registry's SHA-512 before it is unpacked into ``var/ohif/<version>``.
The tests themselves download nothing. Without it, or without Chromium, the tests using them
are skipped, or fail in CI (CI=true).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
OHIF_VERSION: Final = "3.13.2"
OHIF_TARBALL: Final = f"https://registry.npmjs.org/@ohif/app/-/app-{OHIF_VERSION}.tgz"
OHIF_SHA512: Final = (
    "WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
OHIF_DIR: Final = ROOT / "var" / "ohif" / OHIF_VERSION
CHROMIUM: Final = Path("/usr/bin/chromium")


def ohif_dist() -> Path | None:
    """The unpacked build (its ``dist`` folder), if fetched."""
    dist = OHIF_DIR / "dist"
    return dist if (dist / "index.html").is_file() else None


def browser_missing() -> str | None:
    """Why the OHIF tests cannot run here, or None."""
    if not CHROMIUM.is_file():
        return "Debian's chromium is not installed (apt-get install chromium)"
    if ohif_dist() is None:
        return f"OHIF {OHIF_VERSION} is not fetched (make ohif)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (the Python package) is not installed"
    return None


def fetch_ohif() -> Path:
    """Download the pinned build, check it, unpack its ``dist``; the ``dist`` folder."""
    if (dist := ohif_dist()) is not None:
        return dist
    OHIF_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OHIF_DIR.parent) as work:
        tarball = Path(work) / "ohif.tgz"
        with (
            urllib.request.urlopen(OHIF_TARBALL, timeout=120) as answer,
            tarball.open("wb") as out,
        ):
            shutil.copyfileobj(answer, out)
        digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != OHIF_SHA512:
            raise SystemExit(f"{OHIF_TARBALL}: SHA-512 {digest}, expected {OHIF_SHA512}")
        unpacked = Path(work) / "unpacked"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(unpacked, members=members, filter="data")
        if OHIF_DIR.exists():
            shutil.rmtree(OHIF_DIR)
        OHIF_DIR.mkdir(parents=True)
        (unpacked / "package" / "dist").rename(OHIF_DIR / "dist")
    dist = ohif_dist()
    if dist is None:
        raise SystemExit(f"{OHIF_TARBALL}: no dist/index.html in the package")
    return dist


if __name__ == "__main__":
    if os.environ.get("RELAIS_SKIP_OHIF"):
        sys.exit(0)
    print(f"OHIF {OHIF_VERSION}: {fetch_ohif()}")

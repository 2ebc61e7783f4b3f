"""DCMTK's command-line tools as the real DICOM clients of the tests.

In CI (``CI=true``) a missing tool fails the test that needs it; elsewhere it is skipped.
Every tool runs with ``TCP_NODELAY=1`` (DCMTK leaves Nagle's algorithm on otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.peers.fixtures import require


def require_tool(name: str) -> str:
    """The path of DCMTK's ``name``; fails in CI, skips elsewhere, when it is missing."""
    path = shutil.which(name)
    require(
        None if path is not None else f"DCMTK's {name} is not installed (apt-get install dcmtk)"
    )
    assert path is not None
    return path


def run_tool(
    name: str, arguments: Sequence[str | Path], *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (verbose), returning its exit code and its whole output."""
    command = [require_tool(name), "-v", *(str(a) for a in arguments)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )

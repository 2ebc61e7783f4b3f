"""What management commands share: the audit actor of an operator at the console."""

from __future__ import annotations

import getpass
import socket

from audit.services import Actor


def cli_actor(command: str) -> Actor:
    """The operator running a management command, as the audit trail names them."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        login = "unknown"
    return Actor(
        kind="system",
        user_id=None,
        username=f"cli:{login}",
        role=f"manage.py {command}",
        address=socket.gethostname(),
    )

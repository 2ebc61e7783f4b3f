"""``manage.py rotate_signing_key``: a new key signs tokens from now on."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from audit.events import EventCode
from audit.services import audit_record
from broker.cli import cli_actor
from broker.keys import signing_key_rotate, signing_keys


class Command(BaseCommand):
    help = (
        "Make a new token signing key current. The previous key still verifies the tokens it "
        "signed until they expire (it stays in /.well-known/jwks.json for a token's lifetime)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        previous = signing_keys(settings.DATA_DIR)[0].kid
        kid = signing_key_rotate(settings.DATA_DIR)
        with transaction.atomic():
            audit_record(
                code=EventCode.SIGNING_KEY_ROTATE,
                actor=cli_actor("rotate_signing_key"),
                now=timezone.now(),
                objects=[{"type": "signing-key", "kid": kid}],
                details={"new": kid, "retired": previous},
            )
        self.stdout.write(f"Signing key {kid} is current; {previous} is retired.")

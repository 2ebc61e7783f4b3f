from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from broker.cli import cli_actor
from broker.models import Institution
from broker.services import api_key_create


class Command(BaseCommand):
    help = (
        "Create an API key for an institution's system. The key is printed once and "
        "stored hashed: keep it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--institution", required=True, metavar="FINESS")
        parser.add_argument(
            "--name", default="", help="what the key is for (e.g. 'PACS Carestream')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        institution = Institution.objects.filter(finess=options["institution"]).first()
        if institution is None:
            raise CommandError(f"No institution with FINESS {options['institution']}")
        key_object, key = api_key_create(
            institution=institution,
            name=options["name"],
            actor=cli_actor("create_api_key"),
            now=timezone.now(),
        )
        self.stderr.write(
            f"API key {key_object.prefix} for {institution}. "
            "Send it as 'Authorization: Api-Key <key>'. It is shown only now:"
        )
        self.stdout.write(key)

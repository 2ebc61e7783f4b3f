from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from broker.cli import cli_actor
from broker.errors import DomainError
from broker.services import institution_create


class Command(BaseCommand):
    help = "Onboard an institution of the region (same service as the administrators' API)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--finess", required=True, help="FINESS number (9 characters)")
        parser.add_argument("--name", required=True)
        parser.add_argument("--issuer", required=True, help="IssuerOfPatientID of its local IDs")
        parser.add_argument("--issuer-oid", default="", help="OID of its patient ID domain")
        parser.add_argument("--ae-title", default="")
        parser.add_argument("--host", default="", help="archive DICOM host")
        parser.add_argument("--port", type=int, default=None, help="archive DICOM port")
        parser.add_argument("--dicomweb-url", default="")
        parser.add_argument(
            "--transport",
            choices=["dicomweb", "dimse"],
            default="",
            help="how to query the archive (default: DICOMweb when it has a URL, else DIMSE)",
        )
        parser.add_argument("--inactive", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            institution = institution_create(
                finess=options["finess"],
                name=options["name"],
                patient_id_issuer=options["issuer"],
                patient_id_issuer_oid=options["issuer_oid"],
                ae_title=options["ae_title"],
                dicom_host=options["host"],
                dicom_port=options["port"],
                dicomweb_url=options["dicomweb_url"],
                archive_transport=options["transport"],
                active=not options["inactive"],
                actor=cli_actor("add_institution"),
                now=timezone.now(),
            )
        except DomainError as exc:
            raise CommandError(exc.detail) from exc
        self.stdout.write(self.style.SUCCESS(f"Institution {institution} added."))

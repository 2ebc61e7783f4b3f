from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from tqdm import tqdm

from broker.cli import cli_actor
from broker.errors import DomainError
from broker.models import Institution
from broker.services import manifest_register


def _files(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise CommandError(f"{path}: no such file or folder")


class Command(BaseCommand):
    help = (
        "Bulk import of KOS manifests (files or folders) for one institution. Prints a summary; "
        "exits non-zero if any file was rejected."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH")
        parser.add_argument("--institution", required=True, metavar="FINESS")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        institution = Institution.objects.filter(finess=options["institution"]).first()
        if institution is None:
            raise CommandError(f"No institution with FINESS {options['institution']}")
        files = list(_files(options["paths"]))
        actor = cli_actor("import_manifests")
        counts: Counter[str] = Counter()
        rejected: list[tuple[Path, str]] = []
        limit = settings.RELAIS_MAX_MANIFEST_BYTES
        progress = tqdm(
            files,
            unit="file",
            disable=options["no_progress"],
            file=self.stderr._out,  # type: ignore[attr-defined]
            dynamic_ncols=True,
        )
        for path in progress:
            try:
                with path.open("rb") as handle:
                    data = handle.read(limit + 1)
                result = manifest_register(
                    data=data, institution=institution, actor=actor, now=timezone.now()
                )
            except DomainError as exc:
                counts["rejected"] += 1
                rejected.append((path, f"{exc.code}: {exc.detail}"))
                continue
            except OSError as exc:
                counts["rejected"] += 1
                rejected.append((path, f"unreadable: {exc}"))
                continue
            counts[result.outcome] += 1
        progress.close()
        self.stdout.write(
            f"{len(files)} files: {counts['new']} new, {counts['unchanged']} unchanged, "
            f"{counts['replaced']} replaced, {counts['rejected']} rejected"
        )
        for path, reason in rejected:
            self.stdout.write(f"  rejected {path}: {reason}")
        if rejected:
            raise CommandError(f"{len(rejected)} file(s) rejected", returncode=1)

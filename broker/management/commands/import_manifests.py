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
from broker.models import Institution
from broker.services import manifests_register


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


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
        parser.add_argument(
            "--batch-size",
            type=_positive_int,
            default=100,
            help="manifests registered per transaction (default 100)",
        )

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
            total=len(files),
            unit="file",
            disable=options["no_progress"],
            file=self.stderr._out,  # type: ignore[attr-defined]
            dynamic_ncols=True,
        )
        for chunk in _chunks(files, options["batch_size"]):
            documents: list[bytes] = []
            readable: list[Path] = []
            for path in chunk:
                try:
                    with path.open("rb") as handle:
                        documents.append(handle.read(limit + 1))
                    readable.append(path)
                except OSError as exc:
                    counts["rejected"] += 1
                    rejected.append((path, f"unreadable: {exc}"))
            results = manifests_register(
                documents=documents, institution=institution, actor=actor, now=timezone.now()
            )
            for path, result in zip(readable, results, strict=True):
                counts[result.outcome] += 1
                if result.error is not None:
                    rejected.append((path, f"{result.error.code}: {result.error.detail}"))
            progress.update(len(chunk))
        progress.close()
        self.stdout.write(
            f"{len(files)} files: {counts['new']} new, {counts['unchanged']} unchanged, "
            f"{counts['replaced']} replaced, {counts['rejected']} rejected"
        )
        for path, reason in rejected:
            self.stdout.write(f"  rejected {path}: {reason}")
        if rejected:
            raise CommandError(f"{len(rejected)} file(s) rejected", returncode=1)

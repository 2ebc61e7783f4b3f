"""``manage.py harvest``: register manifests for the prior studies of an institution's archive."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from broker.archives import institution_archive
from broker.cli import cli_actor
from broker.dicom.archive import ArchiveError
from broker.harvest import OUTCOMES, HarvestBusy, HarvestProgress, harvest_run
from broker.models import Institution


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(text) from None


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


class Command(BaseCommand):
    help = (
        "Harvest an institution's archive: query it study by study, build a KOS manifest for "
        "each study and register it. Idempotent and resumable (a checkpoint per institution "
        "and date range, resumed over either transport). Exits non-zero if any study failed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--institution", required=True, metavar="FINESS")
        parser.add_argument("--since", type=_date, default=None, metavar="YYYY-MM-DD")
        parser.add_argument("--until", type=_date, default=None, metavar="YYYY-MM-DD")
        parser.add_argument("--transport", choices=["dicomweb", "dimse"], default=None)
        parser.add_argument(
            "--max-rate",
            type=_rate,
            default=None,
            metavar="STUDIES_PER_SECOND",
            help="at most this many studies a second are queried (spare the source archive)",
        )
        parser.add_argument(
            "--prune",
            action="store_true",
            help="deprecate the manifests of the range whose study is gone from the archive",
        )
        parser.add_argument(
            "--restart", action="store_true", help="ignore an interrupted run's checkpoint"
        )
        parser.add_argument("--workers", type=int, default=2, help="queries in flight (1-8)")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        institution = Institution.objects.filter(finess=options["institution"]).first()
        if institution is None:
            raise CommandError(f"no institution with FINESS {options['institution']}")
        if not institution.active:
            raise CommandError(f"institution {institution.finess} is inactive")
        if options["since"] and options["until"] and options["since"] > options["until"]:
            raise CommandError(f"--since {options['since']} is after --until {options['until']}")
        if not 1 <= options["workers"] <= 8:
            raise CommandError("--workers is 1 to 8")
        transport = options["transport"] or institution.transport
        try:
            institution_archive(institution, transport).close()
        except ValueError as exc:
            raise CommandError(f"{institution.name}: {exc}") from exc

        bar = tqdm(
            total=0,
            unit="study",
            disable=options["no_progress"],
            dynamic_ncols=True,
            desc=f"harvest {institution.finess} ({transport})",
        )

        def progress(state: HarvestProgress) -> None:
            if bar.total != state.total:
                bar.reset(total=state.total)
                bar.update(state.done)
            else:
                bar.update(state.done - bar.n)
            bar.set_postfix(
                {k: state.counts[k] for k in OUTCOMES if state.counts[k]}, refresh=False
            )

        try:
            summary = harvest_run(
                institution=institution,
                client_factory=lambda: institution_archive(institution, transport),
                transport=transport,
                actor=cli_actor("harvest"),
                since=options["since"],
                until=options["until"],
                prune=options["prune"],
                max_rate=options["max_rate"],
                restart=options["restart"],
                workers=options["workers"],
                progress=progress,
            )
        except ArchiveError as exc:
            raise CommandError(f"harvest stopped (resumable): {exc}") from exc
        except HarvestBusy as exc:
            raise CommandError(str(exc)) from exc
        except KeyboardInterrupt:
            raise CommandError("harvest interrupted: run it again to resume") from None
        finally:
            bar.close()
        counts = summary.counts
        rate = (summary.total - summary.resumed_after) / summary.seconds if summary.seconds else 0
        dates = summary.date_range.replace("..", " to ") if summary.date_range != ".." else "all"
        self.stdout.write(
            f"{institution.name} ({institution.finess}), {transport}, dates {dates}: "
            f"{summary.total} studies"
            + (
                f" ({summary.resumed_after} done by the interrupted run)"
                if summary.resumed_after
                else ""
            )
            + f" in {summary.seconds:.1f} s ({rate:.1f} studies/s)"
        )
        for outcome in OUTCOMES:
            self.stdout.write(f"  {outcome:<11}{counts[outcome]}")
        for study_uid, reason in summary.failures:
            self.stderr.write(f"  failed {study_uid}: {reason}")
        if counts["failed"]:
            raise CommandError(f"{counts['failed']} studies failed")

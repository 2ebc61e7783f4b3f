"""Pytest fixtures with real Orthanc archives (registered by tests/conftest.py).

- `orthanc_region` (session): CHUB_PACS and PORTMAEL_PACS loaded with `region_studies()`,
  each knowing the broker as modality "RELAIS" at 127.0.0.1:`broker_port`. Read-only.
- `orthanc_factory` (function): `orthanc_factory("AET", modalities={...})` starts a fresh,
  empty archive the test may change; all are stopped after the test.

Without Orthanc installed the tests using them are skipped, or fail when CI=true.
Stopping an Orthanc takes it ~3.5 s: a test's archives are only signalled at its teardown and
waited for at the end of the session, so tests do not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.peers.orthanc import OrthancArchive, free_port, orthanc_available, start_orthanc
from tests.peers.studies import SyntheticStudy, region_studies

BROKER_MODALITY: str = "RELAIS"


def require(missing: str | None) -> None:
    """A real peer the test needs: `missing` says why it is not here (None: it is). Skip the
    test without it; fail it instead in CI (CI=true), where every peer must be."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing)
    pytest.skip(missing)


def require_orthanc() -> None:
    require(orthanc_available())


@dataclass(frozen=True)
class OrthancRegion:
    """The region's archives by AE title, the studies each holds, the broker's SCP port."""

    archives: dict[str, OrthancArchive]
    studies: dict[str, list[SyntheticStudy]]
    broker_port: int


class OrthancFactory(Protocol):
    def __call__(
        self, aet: str, modalities: Mapping[str, tuple[str, str, int]] | None = None
    ) -> OrthancArchive: ...


@pytest.fixture(scope="session")
def _orthanc_reaper() -> Iterator[list[OrthancArchive]]:
    """Archives signalled to stop; waited for (and killed if need be) at session end."""
    stopping: list[OrthancArchive] = []
    yield stopping
    _stop_all(stopping)


@pytest.fixture(scope="session")
def orthanc_region(
    tmp_path_factory: pytest.TempPathFactory, _orthanc_reaper: list[OrthancArchive]
) -> Iterator[OrthancRegion]:
    require_orthanc()
    workdir = tmp_path_factory.mktemp("orthanc-region")
    broker_port = free_port()
    modalities = {BROKER_MODALITY: (BROKER_MODALITY, "127.0.0.1", broker_port)}
    studies = region_studies()
    archives: dict[str, OrthancArchive] = {}
    try:
        for aet in studies:
            archives[aet] = start_orthanc(workdir / aet, aet=aet, modalities=modalities)
        for aet, archive in archives.items():
            archive.upload_many(instance for study in studies[aet] for instance in study.instances)
        yield OrthancRegion(archives=archives, studies=studies, broker_port=broker_port)
    finally:
        _signal_all(archives.values(), _orthanc_reaper)


@pytest.fixture
def orthanc_factory(
    tmp_path: Path, _orthanc_reaper: list[OrthancArchive]
) -> Iterator[OrthancFactory]:
    require_orthanc()
    started: list[OrthancArchive] = []

    def start(
        aet: str, modalities: Mapping[str, tuple[str, str, int]] | None = None
    ) -> OrthancArchive:
        archive = start_orthanc(
            tmp_path / f"orthanc-{len(started)}-{aet}", aet=aet, modalities=modalities
        )
        started.append(archive)
        return archive

    try:
        yield start
    finally:
        _signal_all(started, _orthanc_reaper)


def _signal_all(archives: Iterable[OrthancArchive], reaper: list[OrthancArchive]) -> None:
    for archive in archives:
        archive.terminate()
        reaper.append(archive)


def _stop_all(archives: list[OrthancArchive]) -> None:
    for archive in archives:
        archive.terminate()
    for archive in archives:
        archive.stop()

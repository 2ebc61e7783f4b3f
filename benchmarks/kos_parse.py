#!/usr/bin/env python
"""Manifest benchmark: time to parse and to build a KOS of 30, 400 and 1,000 instances.

    .venv/bin/python benchmarks/kos_parse.py [--repeat 7] [--json out.json]

The manifests are those of the test factories (a CT study of Marie DUPONT, retrievable from an
AE title, two patient identifiers, an accession number): 3 series x 10 instances, 4 series x 100
and 10 series x 100. Each figure is the best of ``--repeat`` rounds, a round being the mean of
as many calls as fit in about 0.2 s (so that a busy neighbour process inflates it less).

Columns: ``parse_kos`` on the bytes ``build_kos`` writes (explicit VR, defined lengths); on the
same manifest as archives often send it, implicit VR with undefined-length sequences and items;
``parse_kos_dataset`` on an already decoded dataset (the DIMSE path, which pydicom still reads:
the dataset is read afresh each time, pydicom's read not included); ``build_kos``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from broker.dicom.kos import (  # noqa: E402
    OtherPatientId,
    StudyDescription,
    build_kos,
    parse_kos,
    parse_kos_dataset,
)
from tests.dicom_factories import (  # noqa: E402
    NIR,
    NOW,
    STUDY_UID,
    dataset_to_bytes,
    make_patient,
    make_series,
    make_study_description,
)

SIZES = ((3, 10), (4, 100), (10, 100))  # (series, instances per series)


def study(series_count: int, per_series: int) -> StudyDescription:
    return make_study_description(
        patient=make_patient(other_ids=(OtherPatientId(NIR, None, "1.2.250.1.213.1.4.8", "TEXT"),)),
        series=tuple(
            make_series(STUDY_UID, number, instance_count=per_series)
            for number in range(1, series_count + 1)
        ),
    )


def as_archives_send_it(data: bytes) -> bytes:
    """The manifest in implicit VR little endian, sequences and items of undefined length."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    return dataset_to_bytes(ds, implicit_vr=True)


def best_ms(call: Callable[[], object], repeat: int, budget: float = 0.2) -> float:
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-6)
    loops = max(1, int(budget / once))
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        rounds.append((time.perf_counter() - start) / loops)
    return min(rounds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    rows = []
    for series_count, per_series in SIZES:
        description = study(series_count, per_series)
        data = build_kos(description, now=NOW)
        archive_data = as_archives_send_it(data)
        instances = series_count * per_series
        assert parse_kos(data).instance_count == instances
        assert parse_kos(archive_data).instance_count == instances
        syntax = pydicom.uid.ExplicitVRLittleEndian

        def from_dataset(data: bytes = data, syntax: str = syntax) -> object:
            return parse_kos_dataset(pydicom.dcmread(io.BytesIO(data)), transfer_syntax_uid=syntax)

        def dcmread_only(data: bytes = data) -> object:
            return pydicom.dcmread(io.BytesIO(data))

        read_ms = best_ms(dcmread_only, args.repeat)
        rows.append(
            {
                "instances": instances,
                "bytes": len(data),
                "parse_kos_ms": best_ms(lambda data=data: parse_kos(data), args.repeat),
                "parse_kos_implicit_undefined_ms": best_ms(
                    lambda data=archive_data: parse_kos(data), args.repeat
                ),
                "parse_kos_dataset_ms": best_ms(from_dataset, args.repeat) - read_ms,
                "build_kos_ms": best_ms(
                    lambda description=description: build_kos(description, now=NOW), args.repeat
                ),
            }
        )

    print(
        "| instances | bytes | parse_kos ms | parse_kos ms (implicit VR, undefined lengths) "
        "| parse_kos_dataset ms | build_kos ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['instances']} | {row['bytes']} | {row['parse_kos_ms']:.3f} "
            f"| {row['parse_kos_implicit_undefined_ms']:.3f} "
            f"| {row['parse_kos_dataset_ms']:.3f} | {row['build_kos_ms']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""A demo region: three institutions, a user for every role, patients and their manifests.

Idempotent: when the demo region is already there, it only prints the accounts.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from broker.cli import cli_actor
from broker.dicom.kos import (
    INS_NIR_TEST_OID,
    OtherPatientId,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
    build_kos,
)
from broker.models import Institution, Membership, Professional, Role
from broker.services import institution_create, manifest_register

DEMO_PASSWORD = "relais-demo-2026"  # noqa: S105 - documented demo accounts, demo region only
UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # demo studies only

INSTITUTIONS = [
    {
        "finess": "350000014",
        "name": "CHU de Bellecombe",
        "patient_id_issuer": "CHU-BELLECOMBE",
        "patient_id_issuer_oid": "1.2.250.1.999.350000014",
        "ae_title": "CHUB_PACS",
        "dicom_host": "127.0.0.1",
        "dicom_port": 4242,
        "dicomweb_url": "http://127.0.0.1:8042/dicom-web/",
    },
    {
        "finess": "560000019",
        "name": "Centre hospitalier de Port-Maël",
        "patient_id_issuer": "CH-PORTMAEL",
        "ae_title": "PORTMAEL_PACS",
        "dicom_host": "127.0.0.1",
        "dicom_port": 4243,
    },
    {
        "finess": "290000012",
        "name": "Hôpital de Saint-Aubin",
        "patient_id_issuer": "HOP-SAINTAUBIN",
        "dicomweb_url": "http://127.0.0.1:8044/dicom-web/",
    },
]

# username, first name, last name, RPPS, [(FINESS, role)], region admin
USERS: list[tuple[str, str, str, str, list[tuple[str, str]], bool]] = [
    ("dr.martin", "Claire", "Martin", "10001000011", [("560000019", Role.REFERRING_DOCTOR)], False),
    ("dr.bernard", "Hugo", "Bernard", "10001000022", [("350000014", Role.RADIOLOGIST)], False),
    ("dr.thomas", "Inès", "Thomas", "10001000033", [("350000014", Role.TELERADIOLOGIST)], False),
    ("dr.petit", "Yann", "Petit", "10001000044", [("290000012", Role.EMERGENCY_DOCTOR)], False),
    ("m.robert", "Sophie", "Robert", "", [("290000012", Role.ADMISSIONS_CLERK)], False),
    ("admin.portmael", "Luc", "Moreau", "", [("560000019", Role.INSTITUTION_ADMIN)], False),
    ("dpo.bellecombe", "Anne", "Fournier", "", [("350000014", Role.DPO)], False),
    ("admin.region", "Paul", "Girard", "", [], True),
]


def _patient(
    pid: str,
    issuer: str,
    family: str,
    given: str,
    birth: dt.date,
    sex: str,
    ins: str | None = None,
) -> PatientInfo:
    other_ids = (
        (
            OtherPatientId(
                value=ins, issuer=None, issuer_oid=INS_NIR_TEST_OID, type_of_patient_id="TEXT"
            ),
        )
        if ins
        else ()
    )
    return PatientInfo(
        patient_id=pid,
        issuer=issuer,
        issuer_oid=None,
        family_name=family,
        given_names=given,
        birth_name=family,
        birth_date=birth,
        sex=sex,
        other_ids=other_ids,
    )


def _study(
    number: int,
    patient: PatientInfo,
    *,
    when: dt.date,
    description: str,
    series: list[tuple[str, str, int, str]],
    ae_title: str | None,
    url: str | None,
) -> StudyDescription:
    study_uid = f"{UID_ROOT}{number}"
    return StudyDescription(
        patient=patient,
        study_instance_uid=study_uid,
        accession_number=f"DEMO{number:06d}",
        study_date=when,
        study_time=dt.time(9, 30),
        study_description=description,
        series=tuple(
            SeriesDescription(
                series_instance_uid=f"{study_uid}.{index}",
                modality=modality,
                body_part=body_part,
                instances=tuple(
                    ReferencedInstance(
                        sop_class_uid=sop_class, sop_instance_uid=f"{study_uid}.{index}.{n}"
                    )
                    for n in range(1, count + 1)
                ),
            )
            for index, (modality, sop_class, count, body_part) in enumerate(series, start=1)
        ),
        retrieve_ae_title=ae_title,
        retrieve_url=url,
    )


CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
CR = "1.2.840.10008.5.1.4.1.1.1"


class Command(BaseCommand):
    help = "Load the demo region (institutions, users for every role, patients, manifests)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--password", default=DEMO_PASSWORD, help="password of the demo accounts"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        demo = {spec["finess"] for spec in INSTITUTIONS}
        others = Institution.objects.exclude(finess__in=demo)
        if others.exists():
            # Demo accounts with a published password never go into a real registry.
            raise CommandError(
                f"This registry holds {others.count()} institution(s) of a real region: "
                "the demo region is loaded only into an empty registry"
            )
        if Institution.objects.filter(finess=INSTITUTIONS[0]["finess"]).exists():
            self.stdout.write("The demo region is already loaded.")
        else:
            self._seed(options["password"])
        self._print_accounts(options["password"])

    @transaction.atomic
    def _seed(self, password: str) -> None:
        actor = cli_actor("seed_demo")
        now = timezone.now()
        institutions = {
            spec["finess"]: institution_create(actor=actor, now=now, **spec)  # type: ignore[arg-type]
            for spec in INSTITUTIONS
        }
        user_model = get_user_model()
        for username, first, last, rpps, memberships, region_admin in USERS:
            user = user_model.objects.create_user(
                username=username,
                password=password,
                first_name=first,
                last_name=last,
                email=f"{username}@demo.relais.invalid",
            )
            professional = Professional.objects.create(
                user=user, rpps=rpps, is_region_admin=region_admin
            )
            if region_admin:
                user.is_staff = True
                user.is_superuser = True
                user.save(update_fields=["is_staff", "is_superuser"])
            for finess, role in memberships:
                Membership.objects.create(
                    professional=professional, institution=institutions[finess], role=role
                )

        chu, portmael, staubin = (institutions[s["finess"]] for s in INSTITUTIONS)
        ins_dupont = "2850375123456"  # NIR-shaped test INS (test OID), with no key
        dupont_chu = _patient(
            "100001",
            chu.patient_id_issuer,
            "DUPONT",
            "Marie Anne",
            dt.date(1985, 3, 12),
            "F",
            ins=ins_dupont,
        )
        dupont_pm = _patient(
            "PM-555",
            portmael.patient_id_issuer,
            "DUPONT",
            "Marie",
            dt.date(1985, 3, 12),
            "F",
            ins=ins_dupont,
        )
        leroy_sa = _patient(
            "SA-0042", staubin.patient_id_issuer, "LEROY", "Jean", dt.date(1950, 11, 2), "M"
        )
        leroy_chu = _patient(
            "100777", chu.patient_id_issuer, "LEROY", "Jean Pierre", dt.date(1950, 11, 2), "M"
        )
        martin_pm = _patient(
            "PM-901", portmael.patient_id_issuer, "MARTIN", "Lucas", dt.date(2001, 7, 30), "M"
        )
        studies = [
            (
                chu,
                _study(
                    1,
                    dupont_chu,
                    when=dt.date(2026, 9, 14),
                    description="IRM cérébrale",
                    series=[("MR", MR, 24, "HEAD"), ("MR", MR, 24, "HEAD")],
                    ae_title=chu.ae_title,
                    url=chu.dicomweb_url,
                ),
            ),
            (
                chu,
                _study(
                    2,
                    dupont_chu,
                    when=dt.date(2026, 10, 2),
                    description="Scanner thoracique",
                    series=[("CT", CT, 120, "CHEST")],
                    ae_title=chu.ae_title,
                    url=None,
                ),
            ),
            (
                portmael,
                _study(
                    3,
                    dupont_pm,
                    when=dt.date(2025, 5, 20),
                    description="Radio thorax",
                    series=[("CR", CR, 2, "CHEST")],
                    ae_title=portmael.ae_title,
                    url=None,
                ),
            ),
            (
                staubin,
                _study(
                    4,
                    leroy_sa,
                    when=dt.date(2026, 11, 3),
                    description="Scanner abdomen",
                    series=[("CT", CT, 80, "ABDOMEN"), ("CT", CT, 80, "ABDOMEN")],
                    ae_title=None,
                    url=staubin.dicomweb_url,
                ),
            ),
            (
                chu,
                _study(
                    5,
                    leroy_chu,
                    when=dt.date(2024, 1, 9),
                    description="IRM genou",
                    series=[("MR", MR, 30, "KNEE")],
                    ae_title=chu.ae_title,
                    url=None,
                ),
            ),
            (
                portmael,
                _study(
                    6,
                    martin_pm,
                    when=dt.date(2026, 11, 20),
                    description="Radio poignet",
                    series=[("CR", CR, 2, "WRIST")],
                    ae_title=portmael.ae_title,
                    url=None,
                ),
            ),
        ]
        for institution, study in studies:
            data = build_kos(study, now=now, uid_root=UID_ROOT)
            manifest_register(data=data, institution=institution, actor=actor, now=now)
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo region loaded: {len(institutions)} institutions, {len(USERS)} users, "
                f"{len(studies)} manifests."
            )
        )

    def _print_accounts(self, password: str) -> None:
        self.stdout.write(f"Demo accounts (password: {password}):")
        for username, first, last, _rpps, memberships, region_admin in USERS:
            roles = ", ".join(f"{role} @ {finess}" for finess, role in memberships) or (
                "regional administrator" if region_admin else ""
            )
            self.stdout.write(f"  {username:<16} {first} {last:<10} {roles}")

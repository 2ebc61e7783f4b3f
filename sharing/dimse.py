"""The gateway's DIMSE side: a hospital PACS with approved tickets queries (C-FIND) and
retrieves (C-MOVE) the shared studies from the broker's SCP.

A PACS has no token: its association was admitted as its institution's archive (calling AE
title and address, `broker.dicom.scp`), and what it may reach is what its institution's live
tickets reach (approved, not ended; the avis's recipient institution, or the requester's for
the other purposes). Each C-MOVE is an access decision: the ticket, its scope, and the
patient's consent for the ticket's holder at that institution, now; permit or deny, audited.
A C-FIND lists only what such a decision would permit now (the consent is evaluated, not
held: nothing is issued).
The instances are fetched from the source archive and sent by C-STORE to the AE registered
for the institution (its archive entry), never to another: an unknown destination is refused
(0xA801).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Q
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from audit.events import EventCode, Outcome
from audit.services import Actor, audit_record
from broker.archives import institution_archive
from broker.dicom.matching import KeyTooLong, matches
from broker.dicom.network import EncodedInstance
from broker.dicom.part10 import file_meta
from broker.dicom.read_ahead import ReadAhead
from broker.identity import patient_ref
from broker.models import Institution, Manifest, ManifestInstance, ManifestStatus
from consent import policy
from consent.selectors import consent_evaluate
from consent.services import consent_decide_for_issuance
from sharing.decision import (
    institution_knows_patient,
    policy_professional_id,
    ticket_relationship,
    ticket_studies,
)
from sharing.models import AccessRequest, Purpose, RequestState


@dataclass(frozen=True)
class Reachable:
    ticket: AccessRequest
    manifest: Manifest


def institution_reachable(
    institution: Institution, now: dt.datetime, *, study_instance_uid: str | None = None
) -> dict[str, Reachable]:
    """The studies ``institution``'s live tickets reach, by Study Instance UID (only that one
    study when ``study_instance_uid`` is given: a C-MOVE's, without reading every ticket's
    studies); the first ticket, in the order they were made, that reaches a study is its."""
    tickets = (
        AccessRequest.objects.filter(state=RequestState.APPROVED, not_after__gt=now)
        .filter(
            Q(purpose=Purpose.AVIS, recipient_institution=institution)
            | (~Q(purpose=Purpose.AVIS) & Q(requester_institution=institution))
        )
        .select_related("patient", "requester__user", "recipient__user", "shift")
        .order_by("created_at", "id")
    )
    reachable: dict[str, Reachable] = {}
    for ticket in tickets:
        if ticket.purpose == Purpose.TELERADIOLOGY and (
            ticket.shift is None or ticket.shift.cancelled_at is not None
        ):
            continue
        if (
            study_instance_uid is not None
            and ticket.purpose != Purpose.TELERADIOLOGY
            and not ticket.all_studies
            and study_instance_uid not in (ticket.studies or ())
        ):
            continue  # a ticket naming its studies, not this one
        refs = {(ref.study_instance_uid, ref.source_institution) for ref in ticket_studies(ticket)}
        if study_instance_uid is not None:
            refs = {ref for ref in refs if ref[0] == study_instance_uid}
            if not refs:
                continue
        manifests = (
            Manifest.objects.filter(
                study_instance_uid__in={uid for uid, _ in refs},
                status=ManifestStatus.APPROVED,
                source_identifier__patient_id=ticket.patient_id,
            )
            .select_related("source_institution", "source_identifier")
            .defer("kos_bytes")
            .order_by("registered_at", "id")  # the same copy, whether one study is asked or all
        )
        for manifest in manifests:
            # the study as the ticket reaches it: from its source (a duty ticket's covered
            # institutions), not the same study UID filed by another archive
            if (manifest.study_instance_uid, manifest.source_institution.finess) in refs:
                reachable.setdefault(manifest.study_instance_uid, Reachable(ticket, manifest))
        if study_instance_uid is not None and study_instance_uid in reachable:
            break
    return reachable


class QueryRefused(Exception):
    """A C-FIND that cannot be answered (the DIMSE status says why)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


# Identifier does not match SOP class: a level or a key the Study Root model does not allow.
STATUS_IDENTIFIER_MISMATCH = 0xA900
LEVELS = ("STUDY", "SERIES", "IMAGE")
# The matching keys supported at each level, with their VR; any other key is a return key.
_STUDY_KEYS = {
    "StudyInstanceUID": "UI",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "PatientName": "PN",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "AccessionNumber": "SH",
    "StudyDescription": "LO",
    "ModalitiesInStudy": "CS",
}
_SERIES_KEYS = {"SeriesInstanceUID": "UI", "Modality": "CS", "BodyPartExamined": "CS"}
_IMAGE_KEYS = {"SOPInstanceUID": "UI", "SOPClassUID": "UI"}
# Unique keys (Study Root, hierarchical): always returned at and above the level asked.
_UNIQUE = {"STUDY": ("StudyInstanceUID",), "SERIES": ("StudyInstanceUID", "SeriesInstanceUID")}
_UNIQUE["IMAGE"] = (*_UNIQUE["SERIES"], "SOPInstanceUID")


def find(
    *, institution: Institution, query: Dataset, actor: Actor, now: dt.datetime, ae_title: str
) -> list[Dataset]:
    """C-FIND (Study Root; STUDY, SERIES or IMAGE level) over what the institution's tickets
    reach. Matching follows PS3.4 C.2.2.2 (`broker.dicom.matching`); each answer holds the
    keys asked for, the unique keys down to the level, and the broker's AE title as the
    Retrieve AE Title (the PACS retrieves through the broker). Audited."""
    level = str(query.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryRefused(STATUS_IDENTIFIER_MISMATCH, f"unknown query level {level!r}")
    wanted: dict[str, str] = {
        element.keyword: _key_text(element.value) for element in query if element.keyword
    }
    if level != "STUDY":
        for keyword in _UNIQUE[level][:-1]:  # hierarchical: one value of each level above
            value = wanted.get(keyword, "")
            if not value or "\\" in value or "*" in value or "?" in value:
                raise QueryRefused(
                    STATUS_IDENTIFIER_MISMATCH, f"{keyword} must be one UID at {level} level"
                )
    try:
        answers = _answers(institution, wanted, level, ae_title, now)
    except KeyTooLong as exc:
        raise QueryRefused(STATUS_IDENTIFIER_MISMATCH, str(exc)) from None
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_QUERY,
            actor=actor,
            now=now,
            details={
                "dimse": "C-FIND",
                "level": level,
                "study": wanted.get("StudyInstanceUID", "")[:1024],
                "results": len(answers),
            },
        )
    return answers


def _answers(
    institution: Institution, wanted: dict[str, str], level: str, ae_title: str, now: dt.datetime
) -> list[Dataset]:
    answers = []
    for _uid, found in sorted(institution_reachable(institution, now).items()):
        study = _study_attributes(found.manifest, ae_title)
        if not _all_match(study, wanted, _STUDY_KEYS):
            continue
        # What a C-MOVE would be refused is not listed either: a ticket outlives an opt-in
        # that has expired since, say (a directive change revokes the tickets it restricts).
        decision = _consent(found.ticket, found.manifest, institution, now, consent_evaluate)
        if decision is None or not decision.permit:
            continue
        if level == "STUDY":
            answers.append(_answer(study, wanted, level))
            continue
        for series in found.manifest.series.all().order_by("id"):
            series_attributes = {
                **study,
                "SeriesInstanceUID": series.series_instance_uid,
                "Modality": series.modality,
                "BodyPartExamined": series.body_part,
                "NumberOfSeriesRelatedInstances": series.instance_count,
            }
            if not _all_match(series_attributes, wanted, _SERIES_KEYS):
                continue
            if level == "SERIES":
                answers.append(_answer(series_attributes, wanted, level))
                continue
            for instance in series.instances.all().order_by("id"):
                image = {
                    **series_attributes,
                    "SOPInstanceUID": instance.sop_instance_uid,
                    "SOPClassUID": instance.sop_class_uid,
                }
                if _all_match(image, wanted, _IMAGE_KEYS):
                    answers.append(_answer(image, wanted, level))
    return answers


def _key_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item) for item in value)
    return str(value)


def _study_attributes(manifest: Manifest, ae_title: str) -> dict[str, object]:
    identifier = manifest.source_identifier
    return {
        "StudyInstanceUID": manifest.study_instance_uid,
        "StudyDate": manifest.study_date.strftime("%Y%m%d") if manifest.study_date else "",
        "StudyTime": manifest.study_time.strftime("%H%M%S") if manifest.study_time else "",
        "AccessionNumber": manifest.accession_number,
        "StudyDescription": manifest.study_description,
        "ModalitiesInStudy": list(manifest.modalities),
        "PatientID": identifier.value,
        "IssuerOfPatientID": identifier.issuer,
        "PatientName": "^".join(filter(None, (identifier.family_name, identifier.given_names))),
        "NumberOfStudyRelatedSeries": manifest.series_count,
        "NumberOfStudyRelatedInstances": manifest.instance_count,
        "RetrieveAETitle": ae_title,
    }


def _all_match(attributes: dict[str, object], wanted: dict[str, str], keys: dict[str, str]) -> bool:
    for keyword, vr in keys.items():
        pattern = wanted.get(keyword)
        if pattern is None:
            continue
        value = attributes.get(keyword) or ""
        if not matches(value if isinstance(value, list) else str(value), pattern, vr):
            return False
    return True


def _answer(attributes: dict[str, object], wanted: dict[str, str], level: str) -> Dataset:
    """The identifier answered: the keys asked for that the broker knows, and the unique keys
    down to the level (PS3.4 C.4.1.1.3.2)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in (*_UNIQUE[level], *wanted):
        if keyword in attributes and keyword not in ds:
            value = attributes[keyword]
            setattr(ds, keyword, value if value is not None else "")
    return ds


@dataclass
class MovePlan:
    """What a permitted C-MOVE sends: the instances of one study, read from its source."""

    manifest: Manifest
    ticket: AccessRequest
    allowed: frozenset[str]
    series: str | None = None  # one series asked for: only it is fetched from the source
    sop_classes: frozenset[str] = frozenset()  # of the instances, for the destination's contexts


class MoveRefused(Exception):
    """A C-MOVE that may not be (the DIMSE status says why)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
# C-MOVE has no "not authorised" status of its own (DCMTK calls 0x0124 "unknown" there): a
# refused move is "unable to process", and the audit record says why.
STATUS_REFUSED = 0xC000


def move_plan(
    *,
    institution: Institution,
    level: str,
    study_instance_uids: frozenset[str],
    destination: str,
    actor: Actor,
    now: dt.datetime,
    series_instance_uids: frozenset[str] = frozenset(),
    sop_instance_uids: frozenset[str] = frozenset(),
) -> MovePlan:
    """The decision for a C-MOVE by ``institution``'s PACS (Study Root: a study, some of its
    series, or some instances of one series); audited, permit or deny."""
    study_instance_uid = next(iter(study_instance_uids)) if len(study_instance_uids) == 1 else ""
    asked = {
        "study": study_instance_uid or sorted(study_instance_uids)[:10],
        "level": level[:16],
        "series": sorted(series_instance_uids)[:100],
        "instances": len(sop_instance_uids),
    }
    if destination.strip() != institution.ae_title:
        why = f"destination {destination[:64]!r} is not registered"
        _audit_move(actor, now, None, False, why, asked=asked)
        raise MoveRefused(STATUS_MOVE_DESTINATION_UNKNOWN, "unknown move destination")
    malformed = _move_identifier_problem(
        level, study_instance_uids, series_instance_uids, sop_instance_uids
    )
    if malformed:
        _audit_move(actor, now, None, False, malformed, asked=asked)
        raise MoveRefused(STATUS_IDENTIFIER_MISMATCH, malformed)
    if level == "STUDY":
        series_instance_uids = sop_instance_uids = frozenset()
    elif level == "SERIES":
        sop_instance_uids = frozenset()
    found = institution_reachable(institution, now, study_instance_uid=study_instance_uid).get(
        study_instance_uid
    )
    if found is None:
        _audit_move(
            actor, now, None, False, "no live ticket of this institution reaches it", asked=asked
        )
        raise MoveRefused(STATUS_REFUSED, "no ticket reaches this study")
    ticket, manifest = found.ticket, found.manifest
    instances = ManifestInstance.objects.filter(series__manifest=manifest)
    if series_instance_uids:
        instances = instances.filter(series__series_instance_uid__in=series_instance_uids)
    if sop_instance_uids:
        instances = instances.filter(sop_instance_uid__in=sop_instance_uids)
    rows = list(instances.values_list("sop_instance_uid", "sop_class_uid"))
    allowed = frozenset(sop for sop, _ in rows)
    sop_classes = frozenset(sop_class for _, sop_class in rows)
    if not allowed:
        _audit_move(
            actor, now, ticket, False, "nothing asked for is in the study's manifest", asked=asked
        )
        raise MoveRefused(STATUS_REFUSED, "nothing asked for is in the manifest")
    with transaction.atomic():
        decision = _consent(ticket, manifest, institution, now, consent_decide_for_issuance)
        permit = decision is not None and decision.permit
        _audit_move(
            actor,
            now,
            ticket,
            permit,
            "; ".join(r.text for r in decision.reasons) if decision else "no holder",
            asked=asked,
        )
    if not permit:
        raise MoveRefused(STATUS_REFUSED, "the patient's consent denies it")
    one_series = next(iter(series_instance_uids)) if len(series_instance_uids) == 1 else None
    return MovePlan(
        manifest=manifest,
        ticket=ticket,
        allowed=allowed,
        series=one_series,
        sop_classes=sop_classes,
    )


def _consent(
    ticket: AccessRequest,
    manifest: Manifest,
    institution: Institution,
    now: dt.datetime,
    decide: Callable[..., policy.Decision],
) -> policy.Decision | None:
    """The patient's consent to ``institution`` reaching ``manifest``'s study under ``ticket``,
    now, for the ticket's holder (None: the ticket has no holder). ``decide`` is
    `consent_decide_for_issuance` for a C-MOVE (the patient's row held while it is decided),
    `consent_evaluate` for a C-FIND (a listing: nothing is issued)."""
    holder = ticket.recipient if ticket.purpose == Purpose.AVIS else ticket.requester
    if holder is None:
        return None
    return decide(
        patient=ticket.patient,
        requester=policy.Requester(policy_professional_id(holder), institution.finess),
        relationship=ticket_relationship(
            ticket, institution_knows_patient(institution.pk, ticket.patient_id)
        ),
        purpose=policy.Purpose(ticket.purpose),
        studies=(policy.StudyRef(manifest.study_instance_uid, manifest.source_institution.finess),),
        now=now,
    )


def _move_identifier_problem(
    level: str, studies: frozenset[str], series: frozenset[str], instances: frozenset[str]
) -> str:
    """What makes a C-MOVE identifier unusable (Study Root, hierarchical), or ""."""
    if level not in LEVELS:
        return f"unknown retrieve level {level[:16]!r}"
    if len(studies) != 1:
        return "a C-MOVE names exactly one Study Instance UID"
    if level != "STUDY" and not series:
        return f"a {level}-level C-MOVE names the series"
    if level == "IMAGE" and (len(series) != 1 or not instances):
        return "an IMAGE-level C-MOVE names one series and its instances"
    return ""


class MoveTransfer:
    """The instances of a C-MOVE's plan, from the source archive (C-GET or WADO-RS) to the
    C-STORE sub-operations, which send them as stored (`network.EncodedInstance`).

    The fetch starts at once, in a thread of its own (`ReadAhead`): the archive prepares its
    answer while the broker records Begin Transferring and associates with the destination,
    and it keeps a few instances ahead of the sub-operations. Iterating yields the allowed
    instances; the C-MOVE says what became of each (`record`), that it reached the
    destination (`destination_reached`) or why it stopped (`fail`). `close`, however the move
    ended, stops the fetch and records Instances Transferred: the instances and bytes the
    destination took, those it refused, and the outcome.
    """

    def __init__(self, plan: MovePlan, actor: Actor) -> None:
        self.plan, self.actor = plan, actor
        self.sent = self.size = self.refused = 0
        self.destination_reached = False
        self.complete = False  # every instance the archive gave was handed over
        self.error, self._serious = "", False
        self._patient = patient_ref(plan.ticket.patient)
        self._closed = False
        manifest = plan.manifest
        self._client = institution_archive(manifest.source_institution)
        try:
            self._fetched = ReadAhead(
                self._client.retrieve(manifest.study_instance_uid, plan.series),
                name="C-MOVE fetch",
            )
        except BaseException:
            self._client.close()
            raise
        try:
            _audit_transfer(
                EventCode.TRANSFER_BEGIN, actor, plan, self._patient, Outcome.SUCCESS, {}
            )
        except BaseException:
            self._fetched.close()
            self._client.close()
            self._closed = True
            raise

    def __iter__(self) -> Iterator[EncodedInstance]:
        try:
            for data in self._fetched:
                meta = file_meta(data)
                if meta is None or meta.sop_instance_uid not in self.plan.allowed:
                    continue
                yield EncodedInstance(data, meta)  # sent as stored, not decoded
            self.complete = True
        except Exception as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            raise

    def record(self, instance: EncodedInstance, *, delivered: bool) -> None:
        """What the destination answered to the sub-operation that sent `instance`."""
        if delivered:
            self.sent += 1
            self.size += len(instance.encoded)
        else:
            self.refused += 1

    def fail(self, error: str, *, serious: bool = True) -> None:
        if not self.error:
            self.error, self._serious = error, serious

    def outcome(self) -> Outcome:
        if not self.destination_reached:
            self.fail("the move destination could not be associated")
        elif not self.complete:
            self.fail("cancelled or aborted", serious=False)
        if self.error:
            return Outcome.SERIOUS_FAILURE if self._serious else Outcome.MINOR_FAILURE
        if self.refused:
            self.error = f"{self.refused} instance(s) not stored by the destination"
            return Outcome.MINOR_FAILURE
        return Outcome.SUCCESS

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        from django.utils import timezone

        outcome = self.outcome()
        # The fetch stops after the instance it is reading, and closes its archive stream
        # itself; the client's other resources (a C-FIND association) are closed here.
        self._fetched.close()
        self._client.close()
        _audit_transfer(
            EventCode.TRANSFER_END,
            self.actor,
            self.plan,
            self._patient,
            outcome,
            {
                "instances": self.sent,
                "bytes": self.size,
                "refused": self.refused,
                "error": self.error or None,
            },
            now=timezone.now(),
        )


def _audit_move(
    actor: Actor,
    now: dt.datetime,
    ticket: AccessRequest | None,
    permit: bool,
    why: str,
    *,
    asked: dict[str, object],
) -> None:
    with transaction.atomic():
        audit_record(
            code=EventCode.ACCESS_DECIDE,
            actor=actor,
            now=now,
            outcome=Outcome.SUCCESS if permit else Outcome.MINOR_FAILURE,
            patient=patient_ref(ticket.patient) if ticket else None,
            objects=([{"type": "access-request", "id": str(ticket.public_id)}] if ticket else []),
            purpose_of_use=ticket.purpose if ticket else "",
            correlation_id=ticket.public_id if ticket else None,
            details={"dimse": "C-MOVE", "permit": permit, "why": why, **asked},
        )


def _audit_transfer(
    code: EventCode,
    actor: Actor,
    plan: MovePlan,
    patient: object,
    outcome: Outcome,
    extra: dict[str, object],
    *,
    now: dt.datetime | None = None,
) -> None:
    from django.utils import timezone

    with transaction.atomic():
        audit_record(
            code=code,
            actor=actor,
            now=now or timezone.now(),
            outcome=outcome,
            patient=patient,  # type: ignore[arg-type]
            objects=[
                {"type": "study", "uid": plan.manifest.study_instance_uid},
                {"type": "access-request", "id": str(plan.ticket.public_id)},
            ],
            purpose_of_use=plan.ticket.purpose,
            correlation_id=plan.ticket.public_id,
            details={
                "dimse": "C-MOVE",
                "study": plan.manifest.study_instance_uid,
                "source": plan.manifest.source_institution.finess,
                **extra,
            },
        )

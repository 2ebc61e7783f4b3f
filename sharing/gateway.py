"""The retrieval gateway: a shared study, fetched from the archive that holds it, only with a
valid token, streamed, audited.

A request carries a retrieval token (``Authorization: Bearer``). :func:`gateway_access`
checks it where it is used (`sharing.revocation.token_check`: signature, audience, time,
the revocation copy) and finds its ticket; :func:`gateway_manifest` finds the approved
manifest of a study within the token's scope, and what of it may be reached (a series, an
instance the manifest lists; anything else is the same "not found" as a missing one).
:func:`gateway_retrieve` fetches from the source archive (WADO-RS, or C-GET when it has no
DICOMweb) and yields a ``multipart/related`` body one instance at a time: memory holds one
instance, whatever the study's size. Begin Transferring is audited before the first byte,
Instances Transferred (count, bytes, outcome) when the stream ends, however it ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.events import EventCode, Outcome
from audit.services import Actor, PatientRef, audit_record
from broker.archives import institution_archive
from broker.dicom.archive import ArchiveError, ArchiveNotFound, PendingRetrieval
from broker.dicom.multipart import PendingPart
from broker.dicom.part10 import file_meta
from broker.errors import NotFound
from broker.identity import patient_ref
from broker.models import Manifest, ManifestInstance, ManifestSeries, ManifestStatus
from sharing import tokens
from sharing.models import IssuedToken
from sharing.recent import Recent, recent
from sharing.revocation import revocation_list, token_check
from sharing.zero_copy import ChunkedSocketWriter, ClientGone, SourceFailed

logger = logging.getLogger(__name__)

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


class GatewayRefused(Exception):
    """The token does not open this request (401 for the caller): ``code`` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class TicketRef:
    """The ticket a token was issued under, as the gateway uses it: values, not the model (the
    gateway keeps it across requests and threads, `sharing.recent`)."""

    public_id: uuid.UUID
    purpose: str
    patient_id: int


@dataclass(frozen=True)
class GatewayAccess:
    claims: tokens.Claims
    ticket: TicketRef
    actor: Actor
    patient: PatientRef  # the ticket's patient, as the audit trail names them


@dataclass(frozen=True)
class _Holder:
    """Whom a token was issued to, under which ticket."""

    ticket: TicketRef
    user_id: int
    username: str
    patient: PatientRef


@dataclass(frozen=True)
class _Listed:
    """The instances a manifest lists, by series and in all."""

    by_series: Mapping[str, frozenset[str]]
    every: frozenset[str]


# Kept for about the revocation delay (`sharing.recent`): the holder of each token in use, the
# approved manifest of each (patient, study) asked for, the instances of each manifest (a
# manifest's instances never change). What one process holds at most: 2,048 holders (about a
# kilobyte each), 1,024 manifests (about 5 KB each, with their institution and identifier),
# 50,000 instances (about 200 bytes each): some 17 MB. A study of more instances than that is
# looked up again at each request.
_holders: Recent[_Holder] = recent(2_048)
_manifests: Recent[Manifest] = recent(1_024)
_instances: Recent[_Listed] = recent(50_000, getsizeof=lambda listed: max(1, len(listed.every)))


def gateway_access(*, authorization: str, address: str, now: dt.datetime) -> GatewayAccess:
    """The access a ``Bearer`` token gives now; a refusal is audited, then raised."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    actor = Actor.anonymous(address)
    if scheme.lower() != "bearer" or not token:
        raise _refused("gateway:token:missing", "a retrieval token is required", actor, now)
    try:
        claims = token_check(token, studies=[], now=now)
    except tokens.TokenError as exc:
        raise _refused(exc.code, str(exc), actor, now, token=token) from None
    holder = _holders.get(claims.token_id, lambda: _holder(claims.token_id))
    # on every request, kept or not: the token names the ticket it was issued under
    if holder is None or str(holder.ticket.public_id) != claims.ticket:
        raise _refused(
            "token:not-issued", "not a token this broker issued", actor, now, token=token
        )
    actor = Actor(kind="user", user_id=holder.user_id, username=holder.username, address=address)
    return GatewayAccess(claims=claims, ticket=holder.ticket, actor=actor, patient=holder.patient)


def gateway_session_actor(user: Any, address: str) -> Actor:
    return Actor(kind="user", user_id=user.pk, username=user.get_username(), address=address)


def gateway_session_accesses(*, user: Any, address: str, now: dt.datetime) -> list[GatewayAccess]:
    """What a signed-in user may query (QIDO-RS) without a token in hand: the scope of each
    retrieval token they hold that is valid now (issued, not expired, neither it nor its
    ticket revoked). Each was a permitted, audited access decision; a revocation or a consent
    change that revokes it closes the query side too. Images are never reached this way: a
    retrieval needs the token itself."""
    actor = gateway_session_actor(user, address)
    issued = (
        IssuedToken.objects.select_related("request__patient")
        .filter(
            subject__user=user,
            revoked_at__isnull=True,
            issued_at__lte=now,
            expires_at__gt=now,
        )
        .order_by("issued_at", "id")
    )
    accesses = []
    for row in issued:
        ticket = row.request
        claims = tokens.Claims(
            issuer=settings.RELAIS_TOKEN_ISSUER,
            audience=settings.RELAIS_TOKEN_AUDIENCE,
            subject=user.get_username(),
            token_id=str(row.token_id),
            issued_at=row.issued_at,
            not_before=row.issued_at,
            expires_at=row.expires_at,
            studies=tuple(str(uid) for uid in row.studies),
            purpose=ticket.purpose,
            ticket=str(ticket.public_id),
        )
        if revocation_list().is_revoked(claims, now):
            continue
        accesses.append(
            GatewayAccess(
                claims=claims,
                ticket=TicketRef(
                    public_id=ticket.public_id, purpose=ticket.purpose, patient_id=ticket.patient_id
                ),
                actor=actor,
                patient=patient_ref(ticket.patient),
            )
        )
    return accesses


def _holder(token_id: str) -> _Holder | None:
    issued = (
        IssuedToken.objects.select_related("request__patient", "subject__user")
        .filter(token_id=token_id)
        .first()
    )
    if issued is None:
        return None
    user = issued.subject.user
    ticket = issued.request
    return _Holder(
        ticket=TicketRef(
            public_id=ticket.public_id, purpose=ticket.purpose, patient_id=ticket.patient_id
        ),
        user_id=user.pk,
        username=user.get_username(),
        patient=patient_ref(issued.request.patient),
    )


def gateway_manifest(access: GatewayAccess, study_instance_uid: str) -> Manifest:
    """The approved manifest of a study the token covers, for the ticket's patient."""
    if study_instance_uid not in access.claims.studies:
        raise NotFound("No such study", code="gateway:study:not-found")
    patient_id = access.ticket.patient_id
    manifest = _manifests.get(
        (patient_id, study_instance_uid),
        lambda: (
            Manifest.objects.select_related("source_institution", "source_identifier")
            .defer("kos_bytes")  # the document itself: ~200 bytes an instance, not needed here
            .filter(
                study_instance_uid=study_instance_uid,
                status=ManifestStatus.APPROVED,
                source_identifier__patient_id=patient_id,
            )
            .order_by("-registered_at", "-id")
            .first()
        ),
    )
    if manifest is None:
        raise NotFound("No such study", code="gateway:study:not-found")
    return manifest


def gateway_instances(
    manifest: Manifest, series_uid: str | None = None, sop_uid: str | None = None
) -> frozenset[str]:
    """The SOP Instance UIDs the manifest lists (within a series, or the one asked for)."""
    listed = _instances.get(manifest.pk, lambda: _listed_instances(manifest))
    if listed is None:  # never: a manifest's listing is never None, even empty
        raise NotFound("No such series or instance", code="gateway:instance:not-found")
    in_series = listed.every if series_uid is None else listed.by_series.get(series_uid)
    allowed = in_series or frozenset()
    if sop_uid is not None:
        allowed = allowed & {sop_uid}
    if not allowed:
        raise NotFound("No such series or instance", code="gateway:instance:not-found")
    return allowed


def _listed_instances(manifest: Manifest) -> _Listed:
    by_series: dict[str, set[str]] = {}
    for series_uid, sop_uid in ManifestInstance.objects.filter(
        series__manifest=manifest
    ).values_list("series__series_instance_uid", "sop_instance_uid"):
        by_series.setdefault(series_uid, set()).add(sop_uid)
    frozen = {series_uid: frozenset(sops) for series_uid, sops in by_series.items()}
    return _Listed(by_series=MappingProxyType(frozen), every=frozenset().union(*frozen.values()))


def gateway_series(manifest: Manifest) -> list[ManifestSeries]:
    return list(manifest.series.order_by("id"))


@dataclass
class Transfer:
    """What a retrieval sent, for its audit record."""

    instances: int = 0
    bytes: int = 0
    skipped: int = 0


def gateway_retrieve(
    access: GatewayAccess,
    manifest: Manifest,
    *,
    series_uid: str | None,
    sop_uid: str | None,
    allowed: frozenset[str],
    now: dt.datetime,
    writer: ChunkedSocketWriter | None = None,
) -> tuple[str, Iterator[bytes]]:
    """The content type and the body (``multipart/related``) of a WADO-RS retrieval.

    The first instance is fetched before this returns, so that an archive that is down or
    refuses answers a problem, not a broken stream. Raises `ArchiveError` then.

    With a `writer` (`sharing.zero_copy`: the server lets the body write on the client's
    socket) and a DICOMweb archive, each instance is written by it, its bytes moved from
    socket to socket in the kernel; the body then yields only the framing around them.
    """
    boundary = uuid.uuid4().hex
    patient = access.patient
    client = institution_archive(manifest.source_institution)
    _audit_transfer(EventCode.TRANSFER_BEGIN, access, manifest, patient, now, Outcome.SUCCESS, None)
    transfer = Transfer()
    content_type = f"{MULTIPART_DICOM}; boundary={boundary}"
    retrieve_pending = getattr(client, "retrieve_pending", None)
    try:
        if writer is not None and retrieve_pending is not None:
            pending: PendingRetrieval = retrieve_pending(
                manifest.study_instance_uid, series_uid, sop_uid
            )
            try:
                parts = iter(pending)
                first_part = _next_allowed_part(parts, allowed, transfer)
                if first_part is None:
                    raise _none_held(client)
            except BaseException:
                pending.close()
                raise
            return content_type, _primed(
                _spliced_body(
                    boundary,
                    first_part,
                    pending,
                    parts,
                    writer,
                    client,
                    allowed,
                    transfer,
                    access,
                    manifest,
                    patient,
                )
            )
        source = client.retrieve(manifest.study_instance_uid, series_uid, sop_uid)
        try:
            first = _next_allowed(source, allowed, transfer)
            if first is None:
                raise _none_held(client)
        except BaseException:
            getattr(source, "close", lambda: None)()
            raise
    except Exception as exc:  # an archive's failure, or anything else: before the first byte
        client.close()
        _audit_transfer(
            EventCode.TRANSFER_END, access, manifest, patient, now, _outcome(exc), transfer, exc
        )
        raise
    return content_type, _primed(
        _body(boundary, first, source, client, allowed, transfer, access, manifest, patient)
    )


def _primed(body: Generator[bytes, None, None]) -> Generator[bytes, None, None]:
    """``body`` stepped to its first ``yield`` (an empty piece, just inside its ``try``), so
    that its ``finally`` (the archive's connection closed, Instances Transferred recorded)
    runs however the body ends: a generator closed before its first step skips it, as when the
    server drops a response whose client has already gone."""
    if next(body) != b"":
        body.close()
        raise RuntimeError("a primed body begins with an empty piece")
    return body


def _none_held(client: object) -> ArchiveNotFound:
    """The archive answered, but with none of the instances asked for that the manifest
    lists: a 404 (the registry is behind the archive), not an empty 200."""
    return ArchiveNotFound(
        "the source archive holds none of the instances the manifest lists",
        transport=getattr(client, "transport", "dicomweb"),
    )


def _body(
    boundary: str,
    first: bytes,
    source: Iterator[bytes],
    client: object,
    allowed: frozenset[str],
    transfer: Transfer,
    access: GatewayAccess,
    manifest: Manifest,
    patient: PatientRef,
) -> Generator[bytes, None, None]:
    # Two chunks per instance: the delimiter with the part's headers (and the CRLF ending the
    # part before), then the instance's bytes as the archive client read them, never copied.
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    outcome: Outcome = Outcome.SUCCESS
    error: Exception | None = None
    try:
        yield b""  # taken by `_primed`
        data: bytes | None = first
        while data is not None:
            yield head if not transfer.instances else b"\r\n" + head
            yield data
            transfer.instances += 1
            transfer.bytes += len(data)
            data = _next_allowed(source, allowed, transfer)
        closing = f"--{boundary}--\r\n".encode("ascii")
        yield b"\r\n" + closing if transfer.instances else closing
    # The status is sent: a failure is raised on to the server, which breaks the connection
    # (no closing chunk), so that the client sees a broken transfer, not a well-framed body
    # short of some instances.
    except ArchiveError as exc:
        outcome, error = _outcome(exc), exc
        logger.warning("retrieval of %s cut short: %s", manifest.study_instance_uid, exc)
        raise
    except GeneratorExit:  # the client went away
        outcome, error = Outcome.MINOR_FAILURE, None
        raise
    except Exception as exc:
        outcome, error = Outcome.SERIOUS_FAILURE, exc
        raise
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
        getattr(client, "close", lambda: None)()
        _audit_transfer(
            EventCode.TRANSFER_END,
            access,
            manifest,
            patient,
            timezone.now(),
            outcome,
            transfer,
            error,
        )


def _spliced_body(
    boundary: str,
    first: PendingPart,
    pending: PendingRetrieval,
    parts: Iterator[PendingPart],
    writer: ChunkedSocketWriter,
    client: object,
    allowed: frozenset[str],
    transfer: Transfer,
    access: GatewayAccess,
    manifest: Manifest,
    patient: PatientRef,
) -> Generator[bytes, None, None]:
    # The server writes the status line and headers at the first piece yielded (empty here);
    # then each instance is one chunk the writer sends, the delimiter and headers before it.
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    outcome: Outcome = Outcome.SUCCESS
    error: Exception | None = None
    try:
        yield b""  # taken by `_primed`
        yield b""  # the server sends the status line and headers
        part: PendingPart | None = first
        while part is not None:
            writer.part(
                head if not transfer.instances else b"\r\n" + head,
                part,
                source=pending.fileno,
                timeout=pending.timeout,
            )
            transfer.instances += 1
            transfer.bytes += part.length
            part = _next_allowed_part(parts, allowed, transfer)
        closing = f"--{boundary}--\r\n".encode("ascii")
        yield b"\r\n" + closing if transfer.instances else closing
    # The status is sent: a failure breaks the connection (`abort`), so that the client sees
    # a broken transfer, not a well-framed body short of some instances.
    except (ArchiveError, SourceFailed) as exc:
        outcome, error = Outcome.SERIOUS_FAILURE, exc
        writer.abort()
        logger.warning("retrieval of %s cut short: %s", manifest.study_instance_uid, exc)
    except ClientGone as exc:
        outcome, error = Outcome.MINOR_FAILURE, None
        writer.abort()
        logger.info("retrieval of %s: %s", manifest.study_instance_uid, exc)
    except GeneratorExit:  # the client went away
        outcome, error = Outcome.MINOR_FAILURE, None
        raise
    except Exception as exc:
        outcome, error = Outcome.SERIOUS_FAILURE, exc
        writer.abort()
        raise
    finally:
        pending.close()
        writer.close()
        getattr(client, "close", lambda: None)()
        _audit_transfer(
            EventCode.TRANSFER_END,
            access,
            manifest,
            patient,
            timezone.now(),
            outcome,
            transfer,
            error,
        )


def gateway_metadata(
    access: GatewayAccess,
    manifest: Manifest,
    *,
    series_uid: str | None,
    allowed: frozenset[str],
    now: dt.datetime,
    sop_uid: str | None = None,
) -> list[dict[str, object]]:
    """WADO-RS metadata of what the manifest lists, from the source archive. Bulk data
    references to the archive are left out: they would name a host the viewer cannot, and
    should not, reach; a viewer reads pixels through the gateway's ``frames``."""
    with institution_archive(manifest.source_institution) as client:
        items = client.metadata(manifest.study_instance_uid, series_uid, sop_uid)  # type: ignore[attr-defined]
    kept = []
    for item in items:
        sop = item.get(_SOP_INSTANCE_UID, {}).get("Value", [None])[0]
        if sop not in allowed:
            continue
        kept.append(
            {
                tag: {"vr": value["vr"]} if "BulkDataURI" in value else value
                for tag, value in item.items()
            }
        )
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_METADATA,
            actor=access.actor,
            now=now,
            patient=access.patient,
            objects=[
                {"type": "study", "uid": manifest.study_instance_uid},
                {"type": "access-request", "id": str(access.ticket.public_id)},
            ],
            purpose_of_use=access.ticket.purpose,
            correlation_id=access.ticket.public_id,
            details={"series": series_uid, "instances": len(kept), "jti": access.claims.token_id},
        )
    return kept


def gateway_instance_resource(
    access: GatewayAccess,
    manifest: Manifest,
    *,
    series_uid: str,
    sop_uid: str,
    resource: str,
    accept: str,
    now: dt.datetime,
) -> tuple[str, Iterator[bytes]]:
    """An instance's frames, rendered image or thumbnail, relayed from a DICOMweb archive
    (DIMSE has none: `GatewayUnsupported`). Audited as a transfer."""
    client = institution_archive(manifest.source_institution)
    relay = getattr(client, "instance_resource", None)
    if relay is None:
        client.close()
        raise GatewayUnsupported(
            f"the archive of {manifest.source_institution.name} offers no {resource} (DIMSE)"
        )
    patient = access.patient
    what = f"{sop_uid}/{resource}"
    _audit_transfer(
        EventCode.TRANSFER_BEGIN,
        access,
        manifest,
        patient,
        now,
        Outcome.SUCCESS,
        None,
        resource=what,
    )
    try:
        content_type, body = relay(
            manifest.study_instance_uid, series_uid, sop_uid, resource, accept
        )
    except Exception as exc:
        client.close()
        _audit_transfer(
            EventCode.TRANSFER_END,
            access,
            manifest,
            patient,
            now,
            _outcome(exc),
            Transfer(),
            exc,
            resource=what,
        )
        raise
    return content_type, _primed(_relayed(body, client, access, manifest, patient, what))


def _relayed(
    body: Iterator[bytes],
    client: object,
    access: GatewayAccess,
    manifest: Manifest,
    patient: PatientRef,
    resource: str,
) -> Generator[bytes, None, None]:
    """A frame, rendered image or thumbnail as the archive sends it; Instances Transferred
    (bytes, outcome) once it is sent, or has failed, however it ends."""
    transfer = Transfer(instances=1)
    outcome: Outcome = Outcome.SUCCESS
    error: Exception | None = None
    try:
        yield b""  # taken by `_primed`
        for piece in body:
            transfer.bytes += len(piece)
            yield piece
    except GeneratorExit:  # the client went away
        outcome = Outcome.MINOR_FAILURE
        raise
    except Exception as exc:  # the status is sent: the server breaks the connection
        outcome, error = Outcome.SERIOUS_FAILURE, exc
        logger.warning("%s of %s cut short: %s", resource, manifest.study_instance_uid, exc)
        raise
    finally:
        getattr(body, "close", lambda: None)()
        getattr(client, "close", lambda: None)()
        if outcome is not Outcome.SUCCESS:
            transfer.instances = 0
        _audit_transfer(
            EventCode.TRANSFER_END,
            access,
            manifest,
            patient,
            timezone.now(),
            outcome,
            transfer,
            error,
            resource=resource,
        )


class GatewayUnsupported(Exception):
    """What the source archive cannot give (501 for the caller)."""


_SOP_INSTANCE_UID = "00080018"


def _next_allowed(
    source: Iterator[bytes], allowed: frozenset[str], transfer: Transfer
) -> bytes | None:
    """The next instance the manifest lists; the others the archive may hold are left out."""
    for data in source:
        if media_storage_sop_instance_uid(data) in allowed:
            return data
        transfer.skipped += 1
    return None


def _next_allowed_part(
    parts: Iterator[PendingPart], allowed: frozenset[str], transfer: Transfer
) -> PendingPart | None:
    """`_next_allowed` for parts not yet read whole: the rest of those left out is dropped
    when the next is asked for."""
    for part in parts:
        if media_storage_sop_instance_uid(part.head) in allowed:
            return part
        transfer.skipped += 1
    return None


def media_storage_sop_instance_uid(data: bytes) -> str | None:
    """(0002,0003) of a Part 10 file's meta group, read from its first bytes only; None when
    the file has no valid meta group."""
    meta = file_meta(data)
    return meta.sop_instance_uid if meta is not None else None


def _outcome(exc: Exception) -> Outcome:
    return Outcome.SERIOUS_FAILURE


def _refused(
    code: str, detail: str, actor: Actor, now: dt.datetime, *, token: str = ""
) -> GatewayRefused:
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_REFUSE,
            actor=actor,
            now=now,
            outcome=Outcome.MINOR_FAILURE,
            details={
                "why": code,
                "detail": detail,
                "token_sha256": tokens.token_hash(token) if token else None,
            },
        )
    return GatewayRefused(code, detail)


def gateway_refuse_query(actor: Actor, what: str, now: dt.datetime) -> None:
    """Audit a signed-in user's query for a study none of their tokens covers (answered 404)."""
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_REFUSE,
            actor=actor,
            now=now,
            outcome=Outcome.MINOR_FAILURE,
            details={"why": "gateway:scope", "asked": what, "jti": None},
        )


def gateway_refuse_scope(access: GatewayAccess, what: str, now: dt.datetime) -> None:
    """Audit a request for something outside the token's scope (answered 404)."""
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_REFUSE,
            actor=access.actor,
            now=now,
            outcome=Outcome.MINOR_FAILURE,
            patient=access.patient,
            objects=[{"type": "access-request", "id": str(access.ticket.public_id)}],
            purpose_of_use=access.ticket.purpose,
            correlation_id=access.ticket.public_id,
            details={"why": "gateway:scope", "asked": what, "jti": access.claims.token_id},
        )


def gateway_audit_query(access: GatewayAccess, what: str, count: int, now: dt.datetime) -> None:
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_QUERY,
            actor=access.actor,
            now=now,
            patient=access.patient,
            objects=[{"type": "access-request", "id": str(access.ticket.public_id)}],
            purpose_of_use=access.ticket.purpose,
            correlation_id=access.ticket.public_id,
            details={"query": what, "results": count, "jti": access.claims.token_id},
        )


def gateway_audit_query_empty(actor: Actor, what: str, now: dt.datetime) -> None:
    """A signed-in user's query that showed nothing (no token of theirs reaches a match)."""
    with transaction.atomic():
        audit_record(
            code=EventCode.GATEWAY_QUERY,
            actor=actor,
            now=now,
            details={"query": what, "results": 0, "jti": None},
        )


def _audit_transfer(
    code: EventCode,
    access: GatewayAccess,
    manifest: Manifest,
    patient: PatientRef,
    now: dt.datetime,
    outcome: Outcome,
    transfer: Transfer | None,
    error: Exception | None = None,
    *,
    resource: str | None = None,
) -> None:
    details: dict[str, object] = {
        "study": manifest.study_instance_uid,
        "source": manifest.source_institution.finess,
        "jti": access.claims.token_id,
    }
    if resource is not None:
        details["resource"] = resource
    if transfer is not None:
        details |= {
            "instances": transfer.instances,
            "bytes": transfer.bytes,
            "left_out": transfer.skipped,
        }
    if error is not None:
        details["error"] = f"{type(error).__name__}: {error}"
    with transaction.atomic():
        audit_record(
            code=code,
            actor=access.actor,
            now=now,
            outcome=outcome,
            patient=patient,
            objects=[
                {"type": "study", "uid": manifest.study_instance_uid},
                {"type": "access-request", "id": str(access.ticket.public_id)},
            ],
            purpose_of_use=access.ticket.purpose,
            correlation_id=access.ticket.public_id,
            details=details,
        )

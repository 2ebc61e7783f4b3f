"""The broker's DICOM face: an SCP for C-ECHO and for the C-STORE of KOS manifests.

A manifest received over DIMSE goes through the same registration service as one published
over REST (`broker.registration`). Only the archives of registered, active institutions may
associate: the calling AE title and the peer's address must match an institution's archive
entry, and the called AE title must be the broker's. Any other association is rejected at
association time (A-ASSOCIATE-RJ) and the rejection is audited.

Storage of anything but a KOS is refused per instance with 0x0122 (SOP Class not
supported) rather than at negotiation, so that a PACS sending a whole study gets a clear
status for each image. Each association runs in its own thread (pynetdicom), with its own
database connection, closed when the association ends.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from audit.events import EventCode, Outcome
from audit.services import audit_record
from audit.types import Actor, ActorKind
from broker.dicom.archive import RETRIEVE_SYNTAXES
from broker.dicom.kos import (
    KOS_SOP_CLASS_UID,
    RELAIS_IMPLEMENTATION_CLASS_UID,
    RELAIS_IMPLEMENTATION_VERSION_NAME,
)
from broker.dicom.network import NODELAY_HANDLERS, RelaisAE, StoreResponseDIMSE
from broker.dicom.part10 import part10_file
from broker.dicom.store_session import StoreSession
from broker.errors import Conflict, DomainError, UnprocessableManifest
from broker.intake import IntakeRegistrar, intake_receive
from broker.models import Institution

logger = logging.getLogger(__name__)
_MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8)

# C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PENDING = 0xFF00

# Seconds between two Pending responses to a C-MOVE (`_RelayDIMSE`).
PENDING_INTERVAL = 0.5

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PRESENTATION = 0x03  # reasons: 0x01 temporary congestion, 0x02 local limit exceeded
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07

_ERROR_COMMENT_LENGTH = 64  # ErrorComment is LO


@dataclass(frozen=True)
class SCPConfig:
    ae_title: str
    bind: str
    port: int
    timeout: float = 30.0
    max_associations: int = 32
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Peer:
    """An association whose calling AE title and address matched an institution."""

    institution: Institution
    ae_title: str
    address: str
    # The association's: every manifest it brings is audited under it, received or refused.
    correlation_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def actor(self) -> Actor:
        return Actor(
            kind=ActorKind.INSTITUTION,
            user_id=None,
            username=f"dicom:{self.institution.finess}:{self.ae_title}",
            institution=self.institution.finess,
            role="institution_system",
            address=self.address,
        )


class BrokerSCP:
    """The handlers of the broker's application entity, and the peers it has admitted."""

    def __init__(self, config: SCPConfig, registrar: IntakeRegistrar | None = None) -> None:
        """``registrar``: one to run in this process; without, another process registers
        what this server queues (``manage.py intake_registrar``)."""
        self.config = config
        self.registrar = registrar
        self.server: ThreadedAssociationServer | None = None

    # ------------------------------------------------------------------ the AE

    def application_entity(self) -> AE:
        ae = _BrokerAE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = self.config.timeout
        ae.dimse_timeout = self.config.timeout
        ae.network_timeout = self.config.timeout
        ae.add_supported_context(Verification)
        ae.add_supported_context(KOS_SOP_CLASS_UID)
        # The gateway's DIMSE side: a PACS with tickets queries and retrieves shared studies.
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        # The other storage SOP classes pynetdicom lists (120 of them) are accepted at
        # negotiation and refused per instance (0x0122); any other is refused at negotiation.
        for context in StoragePresentationContexts[:126]:
            if context.abstract_syntax != KOS_SOP_CLASS_UID:
                ae.add_supported_context(context.abstract_syntax)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            *NODELAY_HANDLERS,
            (evt.EVT_CONN_OPEN, self.on_connection),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_ended),
            (evt.EVT_C_ECHO, self.on_c_echo),
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_C_FIND, self.on_c_find),
            (evt.EVT_C_MOVE, self.on_c_move),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
        ]

    def start(self, *, block: bool) -> ThreadedAssociationServer | None:
        """Serve on (bind, port); with ``block`` until interrupted, else in a thread."""
        ae = self.application_entity()
        if self.registrar is not None:
            self.registrar.start()
        self.server = ae.start_server(
            (self.config.bind, self.config.port),
            block=block,
            evt_handlers=self.handlers(),
            ssl_context=self.config.tls,
        )
        return self.server

    # ------------------------------------------------------------------ handlers

    def on_connection(self, event: Any) -> None:
        """The accepted association's C-MOVE responses go through `_RelayDIMSE`.

        DICOM over TLS: the handshake, here in the connection's own thread, with a
        timeout (pynetdicom would do it in its accept loop, where one silent client stops
        the server). A failed handshake is audited and the connection closed."""
        if type(event.assoc.dimse) in (DIMSEServiceProvider, StoreResponseDIMSE):
            event.assoc.dimse.__class__ = _RelayDIMSE
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if not isinstance(sock, ssl.SSLSocket):
            return
        address = str(event.address[0]) if event.address else ""
        try:
            sock.settimeout(self.config.timeout)
            sock.do_handshake()
            sock.settimeout(None)
            event.assoc.relais_tls_subject = _common_name(sock.getpeercert())
        except (OSError, ValueError) as exc:
            logger.warning("DICOM TLS handshake with %s failed: %s", address, exc)
            self._audit_refusal("tls-handshake", f"TLS handshake failed: {exc}", "", "", address)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            _close_connection()

    def on_requested(self, event: Any) -> None:
        """Admit only a registered institution's archive, calling the broker by its name.

        Whatever goes wrong here ends in a rejection: pynetdicom would accept an association
        whose handler raised.
        """
        assoc = event.assoc
        calling = called = address = ""
        try:
            request = assoc.requestor.primitive  # the A-ASSOCIATE-RQ, not yet negotiated
            calling = _ae_title(request.calling_ae_title)
            called = _ae_title(request.called_ae_title)
            address = str(assoc.requestor.address)
            if self._busy():
                # Before any database work: a flood of requests holds no connection.
                logger.warning("DICOM association from %s (%s): too many", calling, address)
                assoc.acse.send_reject(REJECTED_TRANSIENT, SOURCE_PRESENTATION, 0x02)
                assoc.kill()
                return
            close_old_connections()
            if called != self.config.ae_title:
                self._reject(
                    assoc,
                    REASON_CALLED_AE_NOT_RECOGNISED,
                    "called-ae-unknown",
                    f"called AE title {called!r} is not the broker's ({self.config.ae_title!r})",
                    calling,
                    called,
                    address,
                )
                return
            refusal, institution = _institution_for(
                calling, address, getattr(assoc, "relais_tls_subject", None)
            )
            if institution is None:
                if refusal[0] == "host-unresolved":
                    self._reject_transient(assoc, refusal, calling, called, address)
                else:
                    self._reject(
                        assoc,
                        REASON_CALLING_AE_NOT_RECOGNISED,
                        refusal[0],
                        refusal[1],
                        calling,
                        called,
                        address,
                    )
                return
            assoc.relais_peer = Peer(institution=institution, ae_title=calling, address=address)
        except Exception as exc:
            logger.exception("DICOM association from %s (%s): admission failed", calling, address)
            self._reject_transient(
                assoc, ("admission-error", f"{type(exc).__name__}: {exc}"), calling, called, address
            )

    def _busy(self) -> bool:
        server = self.server
        return server is not None and (
            len(server.active_associations) > self.config.max_associations
        )

    def on_c_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def on_c_store(self, event: Any) -> Dataset | int:
        peer = getattr(event.assoc, "relais_peer", None)
        if not isinstance(peer, Peer):  # cannot happen: the association was admitted
            return _status(STATUS_NOT_AUTHORIZED, "association not admitted")
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class != KOS_SOP_CLASS_UID:
            return _status(
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                "Relais stores Key Object Selection manifests only",
            )
        data = part10_file(
            event.request.DataSet.getvalue(),
            sop_class_uid=sop_class,
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            implementation_class_uid=RELAIS_IMPLEMENTATION_CLASS_UID,
            implementation_version_name=RELAIS_IMPLEMENTATION_VERSION_NAME,
            source_ae_title=peer.ae_title,
        )
        return self.register(peer, data)

    def on_c_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        """Study Root C-FIND (STUDY, SERIES or IMAGE level) over what the institution's
        tickets reach."""
        from sharing.dimse import QueryRefused, find

        peer = getattr(event.assoc, "relais_peer", None)
        if not isinstance(peer, Peer):
            yield STATUS_NOT_AUTHORIZED, None
            return
        try:
            close_old_connections()
            answers = find(
                institution=peer.institution,
                query=event.identifier,
                actor=peer.actor(),
                now=timezone.now(),
                ae_title=self.config.ae_title,
            )
        except QueryRefused as refused:
            yield _status(refused.status, refused.comment), None
            return
        except Exception:
            logger.exception("C-FIND from %s failed", peer.ae_title)
            yield 0xC000, None
            return
        finally:
            _close_connection()
        for answer in answers:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, answer

    def on_c_move(self, event: Any) -> Iterator[Any]:
        """C-MOVE of a study the institution's tickets reach, to the institution's own AE:
        fetched from the source archive (`MoveTransfer`), sent by pynetdicom's C-MOVE service
        over a `StoreSession`."""
        from sharing.dimse import MoveRefused, MoveTransfer, move_plan

        peer = getattr(event.assoc, "relais_peer", None)
        query = event.identifier
        studies = _uids(query, "StudyInstanceUID")
        study = next(iter(studies)) if len(studies) == 1 else ""
        if not isinstance(peer, Peer):  # cannot happen: the association was admitted
            yield None, None
            return
        try:
            close_old_connections()
            plan = move_plan(
                institution=peer.institution,
                level=str(getattr(query, "QueryRetrieveLevel", "") or "").strip().upper(),
                study_instance_uids=studies,
                series_instance_uids=_uids(query, "SeriesInstanceUID"),
                sop_instance_uids=_uids(query, "SOPInstanceUID"),
                destination=str(event.move_destination, "ascii", "replace")
                if isinstance(event.move_destination, bytes)
                else str(event.move_destination),
                actor=peer.actor(),
                now=timezone.now(),
            )
        except MoveRefused as refused:
            _close_connection()
            if refused.status == 0xA801:
                yield None, None  # pynetdicom answers "move destination unknown"
                return
            # pynetdicom reads a status only after a destination and a count of sub-operations
            yield peer.institution.dicom_host, peer.institution.dicom_port, _move_kwargs()
            yield 1
            yield refused.status, None
            return
        try:
            transfer = MoveTransfer(plan, peer.actor())  # the fetch starts now
        except Exception:
            logger.exception(
                "C-MOVE of %s for %s: the transfer could not start", study, peer.ae_title
            )
            _close_connection()
            yield peer.institution.dicom_host, peer.institution.dicom_port, _move_kwargs()
            yield 1
            yield 0xC000, None
            return
        sent: set[str] = set()
        event.assoc.relais_store_session = None
        try:
            yield (
                peer.institution.dicom_host,
                peer.institution.dicom_port,
                _move_kwargs(plan.sop_classes),
            )
            yield len(plan.allowed)
            # pynetdicom associated with the destination (`_BrokerAE.associate`)
            transfer.destination_reached = True
            session: StoreSession | None = getattr(event.assoc, "relais_store_session", None)
            for dataset in transfer:
                if event.is_cancelled:
                    transfer.fail("cancelled by the requester", serious=False)
                    yield 0xFE00, None
                    return
                if session is not None and not session.is_established:
                    # the destination aborted or released: the rest would fail one by one
                    transfer.fail("the destination ended the association")
                    yield 0xA702, None  # unable to perform the sub-operations
                    return
                stored = session.stored if session is not None else 0
                sent.add(str(dataset.SOPInstanceUID))
                yield 0xFF00, dataset
                transfer.record(dataset, delivered=session is None or session.stored > stored)
        except Exception:
            logger.exception("C-MOVE of %s for %s failed", study, peer.ae_title)
            yield 0xC000, None
            return
        finally:
            try:
                transfer.close()  # Instances Transferred, however the move ended
            finally:
                _close_connection()
        missing = sorted(plan.allowed - sent)
        if missing:  # the archive did not give them all: not a success
            logger.warning(
                "C-MOVE of %s for %s: %d instance(s) not found at the source",
                study,
                peer.ae_title,
                len(missing),
            )
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = missing
            yield 0xB000, identifier  # sub-operations complete, one or more failures

    def on_ended(self, event: Any) -> None:
        event.assoc.relais_peer = None
        _close_connection()

    # ------------------------------------------------------------------ work

    def register(self, peer: Peer, data: bytes) -> Dataset | int:
        """Check and queue one manifest received from ``peer``; the C-STORE response.

        Success means checked and durably queued: the registrar registers it next
        (`broker.intake`). A document refused on its face gets its status here.
        """
        try:
            close_old_connections()
            intake_receive(
                data=data,
                institution=peer.institution,
                actor=peer.actor(),
                now=timezone.now(),
                correlation_id=peer.correlation_id,
            )
        except DomainError as error:
            return _refusal(error)
        except DatabaseError:
            logger.exception("C-STORE from %s: the registry is unavailable", peer.ae_title)
            return _status(STATUS_OUT_OF_RESOURCES, "registry unavailable, retry later")
        if self.registrar is not None:
            self.registrar.notify()
        return STATUS_SUCCESS  # a plain status: no pydicom data set to build per manifest

    def shutdown(self) -> None:
        """Stop accepting associations, then the registrar (if it runs here)."""
        if self.server is not None:
            self.server.shutdown()
        if self.registrar is not None:
            self.registrar.stop()

    def _reject(
        self,
        assoc: Any,
        reason: int,
        code: str,
        message: str,
        calling: str,
        called: str,
        address: str,
    ) -> None:
        logger.warning("DICOM association refused: %s", message)
        # Audited before the peer learns of the refusal: nothing it does next can precede it.
        self._audit_refusal(code, message, calling, called, address)
        _close_connection()  # not held while the peer takes its time to hang up
        assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, reason)
        # As pynetdicom does for its own rejections: wait until the DUL has sent the
        # A-ASSOCIATE-RJ, or the socket closes under it.
        assoc.kill()

    def _reject_transient(
        self, assoc: Any, refusal: tuple[str, str], calling: str, called: str, address: str
    ) -> None:
        """The broker cannot decide now (database, name resolution): try again later."""
        self._audit_refusal(refusal[0], refusal[1], calling, called, address)
        _close_connection()
        with contextlib.suppress(Exception):
            assoc.acse.send_reject(REJECTED_TRANSIENT, SOURCE_PRESENTATION, 0x01)
            assoc.kill()

    def _audit_refusal(
        self, code: str, message: str, calling: str, called: str, address: str
    ) -> None:
        try:
            close_old_connections()
            with transaction.atomic():
                audit_record(
                    code=EventCode.DICOM_ASSOCIATION_REFUSED,
                    actor=Actor(
                        kind=ActorKind.ANONYMOUS,
                        user_id=None,
                        username=f"dicom:{calling}" if calling else "dicom",
                        address=address,
                    ),
                    now=timezone.now(),
                    outcome=Outcome.MINOR_FAILURE,
                    objects=[
                        {"type": "dicom-association", "calling_ae": calling, "called_ae": called}
                    ],
                    details={
                        "reason": code,
                        "message": message[:500],
                        "tls": self.config.tls is not None,
                    },
                )
        except Exception:
            logger.exception("the refusal of %s (%s) could not be audited", calling, address)


def _institution_for(
    calling: str, address: str, tls_subject: str | None = None
) -> tuple[tuple[str, str], Institution | None]:
    """The institution whose archive is ``calling`` at ``address`` (and, over TLS, presents
    the certificate registered for it, when one is), or why there is none."""
    candidates = list(Institution.objects.filter(ae_title=calling, active=True)) if calling else []
    if not candidates:
        if calling and Institution.objects.filter(ae_title=calling).exists():
            return ("institution-inactive", f"the institution of {calling!r} is inactive"), None
        return ("calling-ae-unknown", f"calling AE title {calling!r} is not registered"), None
    matching = []
    for institution in candidates:
        addresses = _addresses_of(institution.dicom_host)
        if addresses is None:
            return (
                "host-unresolved",
                f"the host of {calling!r} ({institution.dicom_host!r}) cannot be resolved now",
            ), None
        if _same_address(address, addresses):
            matching.append(institution)
    if not matching:
        return (
            "address-mismatch",
            f"calling AE title {calling!r} is registered for another address than {address}",
        ), None
    if len(matching) > 1:
        return (
            "ambiguous",
            f"calling AE title {calling!r} at {address} matches several institutions",
        ), None
    institution = matching[0]
    expected = institution.dicom_tls_subject
    if expected and tls_subject != expected:
        return (
            "tls-subject-mismatch",
            f"calling AE title {calling!r} must present the certificate of {expected!r}, "
            f"not {tls_subject!r}",
        ), None
    return ("", ""), institution


def _common_name(certificate: Any) -> str | None:
    """The subject's Common Name of a peer certificate as `ssl` gives it."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _ae_title(value: str | bytes) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()


def _addresses_of(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The IP addresses a registered host stands for; None when it cannot be resolved now."""
    if not host:
        return set()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    return {_unmapped(str(info[4][0])) for info in infos}


def _same_address(
    address: str, addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> bool:
    try:
        return _unmapped(address) in addresses
    except ValueError:
        return False


def _unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, an IPv4-mapped IPv6 one as the IPv4 it maps (dual-stack sockets)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _DeferredHandshakeServer(ThreadedAssociationServer):
    """pynetdicom's server, but a TLS connection's handshake waits for its own thread
    (`BrokerSCP.on_connection`) instead of blocking the accept loop, and each association's
    copy of the supported contexts is made cheaply (`_Contexts`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _Contexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


class _Contexts(list[PresentationContext]):
    """The server's supported presentation contexts. pynetdicom deep-copies them for every
    association it accepts: 6 ms for the broker's 123 (each C-FIND association a PACS opens
    waited for it). A context is its abstract syntax, its transfer syntaxes and its roles:
    copied as such."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class _BrokerAE(RelaisAE):
    """The SCP's AE. The association pynetdicom's C-MOVE service requests to a destination
    (``store_session=True``, from `_move_kwargs`) is a `StoreSession`, run on the C-MOVE's
    own thread; any other is `RelaisAE`'s."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_class"] = _DeferredHandshakeServer
        return super().make_server(*args, **kwargs)

    def associate(  # type: ignore[override]
        self, addr: str, port: int, *args: Any, store_session: bool = False, **kwargs: Any
    ) -> Any:
        if not store_session:
            return super().associate(addr, port, *args, **kwargs)
        called = kwargs.get("ae_title", "ANY-SCP")
        session = StoreSession.open(
            addr,
            port,
            calling_ae_title=self.ae_title,
            called_ae_title=called.decode("ascii") if isinstance(called, bytes) else str(called),
            contexts=kwargs["contexts"],
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
            network_timeout=self.network_timeout,
            connection_timeout=self.connection_timeout,
        )
        # pynetdicom's C-MOVE service runs on the thread of the association that asked for the
        # move: its handler (`BrokerSCP.on_c_move`) finds the session there.
        requesting = threading.current_thread()
        if isinstance(requesting, Association):
            requesting.relais_store_session = session  # type: ignore[attr-defined]
        return session


class _RelayDIMSE(StoreResponseDIMSE):
    """The DIMSE provider of an association the broker accepted.

    pynetdicom's C-MOVE service answers every sub-operation with a Pending response, which
    PS3.4 C.4.2.3.1 makes optional: each costs the broker about as much as relaying the
    instance. At most one goes out every `PENDING_INTERVAL` seconds (the first at once); the
    final response counts everything. A plain C-STORE response (a manifest received) is
    encoded by `StoreResponseDIMSE`."""

    _last_pending = -PENDING_INTERVAL

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_MOVE) and primitive.Status == STATUS_PENDING:
            now = time.monotonic()
            if now - self._last_pending < PENDING_INTERVAL:
                return
            self._last_pending = now
        super().send_msg(primitive, context_id)


def _refusal(error: DomainError) -> Dataset:
    if isinstance(error, UnprocessableManifest):
        status = (
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
            if error.code in {"kos:wrong-sop-class", "kos:meta-mismatch"}
            else STATUS_CANNOT_UNDERSTAND
        )
    elif isinstance(error, Conflict) and error.code == "registry:institution:inactive":
        status = STATUS_NOT_AUTHORIZED
    else:
        status = STATUS_PROCESSING_FAILURE
    return _status(status, f"{error.code}: {error.detail}")


def _status(status: int, comment: str = "") -> Dataset:
    response = Dataset()
    response.Status = status
    if comment:
        text = comment.encode("ascii", "replace").decode("ascii")
        response.ErrorComment = text[:_ERROR_COMMENT_LENGTH]
    return response


def _close_connection() -> None:
    """Each association thread has its own database connection: close it as it ends."""
    connection.close()


def _uids(query: Dataset, keyword: str) -> frozenset[str]:
    """The UIDs of a list-of-UID key (empty when absent)."""
    value = query.get(keyword)
    if not value:
        return frozenset()
    items = value if isinstance(value, list | tuple | MultiValue) else str(value).split("\\")
    return frozenset(str(item).strip() for item in items if str(item).strip())


def _move_kwargs(sop_classes: Collection[str] = ()) -> dict[str, Any]:
    """How pynetdicom's C-MOVE service associates with the destination: a `StoreSession`
    (`_BrokerAE.associate`), proposing these presentation contexts. For the study's SOP
    classes, one context per transfer syntax an archive may store (compressed ones included),
    so that an instance is sent as stored; otherwise pynetdicom's storage contexts, which
    offer only the uncompressed syntaxes."""
    from pynetdicom import build_context

    classes = sorted(sop_classes)
    if classes and len(classes) * 2 <= _MAX_CONTEXTS:
        per_class = max(2, min(len(RETRIEVE_SYNTAXES), _MAX_CONTEXTS // len(classes)))
        contexts = [
            build_context(sop_class, [syntax])
            for sop_class in classes
            for syntax in RETRIEVE_SYNTAXES[:per_class]
        ]
    else:
        contexts = [build_context(c.abstract_syntax) for c in StoragePresentationContexts]
    return {"contexts": contexts, "store_session": True}

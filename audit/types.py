"""Who did it and about whom: the values every audit event names. Pure: no Django.

Re-exported by :mod:`audit.services`; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Self

IDENTIFIER_KEYS = frozenset({"issuer", "value", "kind"})


class AuditError(Exception):
    """Base of the audit trail's errors."""


class AuditTransactionRequired(AuditError, RuntimeError):
    """``audit_record`` was called outside ``transaction.atomic()``."""


class AuditValueError(AuditError, ValueError):
    """A value that cannot be part of an audit event."""


class AuditImmutable(AuditError):
    """An attempt to change or delete a recorded audit event."""


class ActorKind(StrEnum):
    USER = "user"
    SYSTEM = "system"
    INSTITUTION = "institution"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Actor:
    """The active participant that requested the action (ATNA UserIsRequestor).

    ``user_id`` and ``username`` are plain values, not a foreign key: the trail outlives
    accounts. ``institution`` is a FINESS number (comma-separated when a user acts for
    several), ``role`` a role name (RoleIDCode), ``address`` the network access point.
    """

    kind: ActorKind
    user_id: int | None
    username: str
    institution: str = ""
    role: str = ""
    address: str = ""

    def __post_init__(self) -> None:
        try:
            kind = ActorKind(self.kind)
        except ValueError:
            raise AuditValueError(f"unknown actor kind {self.kind!r}") from None
        object.__setattr__(self, "kind", kind)
        if self.user_id is not None and (
            not isinstance(self.user_id, int) or isinstance(self.user_id, bool)
        ):
            raise AuditValueError(f"user_id is the account's integer id, not {self.user_id!r}")
        if kind is ActorKind.USER and self.user_id is None:
            raise AuditValueError("a user actor needs its user_id")
        if kind is ActorKind.ANONYMOUS and self.user_id is not None:
            raise AuditValueError("an anonymous actor has no user_id")

    @classmethod
    def system(cls, name: str = "relais") -> Self:
        """The broker itself, or one of its processes (``name``), acting on its own."""
        return cls(kind=ActorKind.SYSTEM, user_id=None, username=name)

    @classmethod
    def anonymous(cls, address: str) -> Self:
        """Someone not (yet) authenticated, known only by network address."""
        return cls(kind=ActorKind.ANONYMOUS, user_id=None, username="", address=address)

    @classmethod
    def for_institution(cls, finess: str, *, name: str = "", address: str = "") -> Self:
        """A hospital's system (archive, RIS) acting with the institution's credentials."""
        return cls(
            kind=ActorKind.INSTITUTION,
            user_id=None,
            username=name,
            institution=finess,
            address=address,
        )


@dataclass(frozen=True)
class PatientRef:
    """The patient an event is about: the regional ID and the identifiers known for them.

    ``identifiers`` are ``{"issuer": ..., "value": ..., "kind": ...}`` (an IPP with the
    hospital's issuer, an INS with its OID), all strings.
    """

    patient_id: str
    identifiers: tuple[dict[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.patient_id:
            raise AuditValueError("a patient reference needs the regional patient id")
        for identifier in self.identifiers:
            if set(identifier) != IDENTIFIER_KEYS or not all(
                isinstance(v, str) for v in identifier.values()
            ):
                raise AuditValueError(
                    f"a patient identifier is {{issuer, value, kind}} strings, not {identifier!r}"
                )

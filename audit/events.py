"""Stable audit event codes (``source:subject:action``) and their DICOM / ATNA coding.

Codes are never renamed or reused. Each maps to a DICOM Event ID (PS3.15 A.5,
DCM scheme), an action code (C, R, U, D, E) and optionally an event type code,
so that an event can be exported as an ATNA / DICOM audit message later.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Outcome(IntEnum):
    """EventOutcomeIndicator (RFC 3881 / DICOM PS3.15)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Action(StrEnum):
    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


@dataclass(frozen=True)
class Coded:
    code: str
    scheme: str
    meaning: str


APPLICATION_ACTIVITY = Coded("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = Coded("110101", "DCM", "Audit Log Used")
BEGIN_TRANSFERRING = Coded("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Coded("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Coded("110104", "DCM", "DICOM Instances Transferred")
EXPORT = Coded("110106", "DCM", "Export")
IMPORT = Coded("110107", "DCM", "Import")
PATIENT_RECORD = Coded("110110", "DCM", "Patient Record")
QUERY = Coded("110112", "DCM", "Query")
SECURITY_ALERT = Coded("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Coded("110114", "DCM", "User Authentication")

# Event type codes (DCM), used beside the event IDs above.
APPLICATION_START = Coded("110120", "DCM", "Application Start")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Coded("110136", "DCM", "Security Roles Changed")
NODE_AUTHENTICATION = Coded("110126", "DCM", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = Coded("110127", "DCM", "Emergency Override Started")
EMERGENCY_OVERRIDE_STOPPED = Coded("110138", "DCM", "Emergency Override Stopped")
USE_OF_RESTRICTED_FUNCTION = Coded("110132", "DCM", "Use of a restricted function")
SOFTWARE_CONFIGURATION = Coded("110131", "DCM", "Software Configuration")
AUDIT_RECORDING_CHANGED = Coded("110134", "DCM", "Audit Recording Changed")


@dataclass(frozen=True)
class EventSpec:
    event_id: Coded
    action: Action
    event_type: Coded | None = None


class EventCode(StrEnum):
    """Every kind of audit event the broker writes. Append only; never rename."""

    # Registry: manifests (XDS-I Register Document Set, as an Import of a document).
    MANIFEST_REGISTER = "registry:manifest:register"
    MANIFEST_REPLACE = "registry:manifest:replace"
    MANIFEST_DEPRECATE = "registry:manifest:deprecate"
    MANIFEST_REJECT = "registry:manifest:reject"
    MANIFEST_QUERY = "registry:manifest:query"
    MANIFEST_READ = "registry:manifest:read"
    # Registry: patient identity (PIX-like cross-referencing).
    PATIENT_CREATE = "identity:patient:create"
    PATIENT_LINK = "identity:patient:link"
    PATIENT_UNLINK = "identity:patient:unlink"
    PATIENT_CANDIDATE = "identity:candidate:create"
    PATIENT_CANDIDATE_CONFIRM = "identity:candidate:confirm"
    PATIENT_CANDIDATE_REJECT = "identity:candidate:reject"
    PATIENT_QUERY = "identity:patient:query"
    IDENTIFIER_ADD = "identity:identifier:add"
    IDENTIFIER_TRAITS = "identity:identifier:traits"
    # Institutions and their systems.
    INSTITUTION_CREATE = "registry:institution:create"
    INSTITUTION_UPDATE = "registry:institution:update"
    API_KEY_CREATE = "security:api-key:create"
    API_KEY_REVOKE = "security:api-key:revoke"
    API_KEY_REFUSED = "security:api-key:refuse"
    DICOM_ASSOCIATION_REFUSED = "security:dicom-association:refuse"
    SIGNING_KEY_ROTATE = "security:signing-key:rotate"
    # Harvest of an archive's prior studies (a run, start to end; its manifests are
    # audited one by one as registrations).
    HARVEST_START = "registry:harvest:start"
    HARVEST_FINISH = "registry:harvest:finish"
    # Consent: patients' directives and their evaluation.
    CONSENT_RECORD = "consent:directive:record"
    CONSENT_WITHDRAW = "consent:directive:withdraw"
    CONSENT_AMEND = "consent:directive:amend"
    CONSENT_EVALUATE = "consent:policy:evaluate"
    CONSENT_READ = "consent:directive:read"
    # Sharing: access requests (tickets), the access decision, tokens, duty, emergency.
    REQUEST_CREATE = "sharing:request:create"
    REQUEST_APPROVE = "sharing:request:approve"
    REQUEST_DENY = "sharing:request:deny"
    REQUEST_CANCEL = "sharing:request:cancel"
    REQUEST_EXPIRE = "sharing:request:expire"
    REQUEST_REVOKE = "sharing:request:revoke"
    REQUEST_READ = "sharing:request:read"
    AVIS_ANSWER = "sharing:avis:answer"
    ACCESS_DECIDE = "sharing:access:decide"
    TOKEN_ISSUE = "sharing:token:issue"  # noqa: S105 - an event code
    TOKEN_REVOKE = "sharing:token:revoke"  # noqa: S105 - an event code
    TOKEN_INTROSPECT = "sharing:token:introspect"  # noqa: S105 - an event code
    SHIFT_CREATE = "sharing:shift:create"
    SHIFT_CANCEL = "sharing:shift:cancel"
    EMERGENCY_START = "sharing:emergency:start"
    EMERGENCY_STOP = "sharing:emergency:stop"
    EMERGENCY_REVIEW = "sharing:emergency:review"
    # The retrieval gateway.
    TRANSFER_BEGIN = "gateway:transfer:begin"
    TRANSFER_END = "gateway:transfer:end"
    GATEWAY_QUERY = "gateway:query"
    GATEWAY_METADATA = "gateway:metadata:read"
    GATEWAY_REFUSE = "gateway:access:refuse"
    # The audit trail itself.
    AUDIT_VERIFY = "audit:chain:verify"
    AUDIT_EXPORT = "audit:log:export"


EVENT_SPECS: dict[EventCode, EventSpec] = {
    EventCode.MANIFEST_REGISTER: EventSpec(IMPORT, Action.CREATE),
    EventCode.MANIFEST_REPLACE: EventSpec(IMPORT, Action.UPDATE),
    EventCode.MANIFEST_DEPRECATE: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.MANIFEST_REJECT: EventSpec(IMPORT, Action.CREATE),
    EventCode.MANIFEST_QUERY: EventSpec(QUERY, Action.EXECUTE),
    EventCode.MANIFEST_READ: EventSpec(PATIENT_RECORD, Action.READ),
    EventCode.PATIENT_CREATE: EventSpec(PATIENT_RECORD, Action.CREATE),
    EventCode.PATIENT_LINK: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.PATIENT_UNLINK: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.PATIENT_CANDIDATE: EventSpec(PATIENT_RECORD, Action.CREATE),
    EventCode.PATIENT_CANDIDATE_CONFIRM: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.PATIENT_CANDIDATE_REJECT: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.PATIENT_QUERY: EventSpec(QUERY, Action.EXECUTE),
    EventCode.IDENTIFIER_ADD: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.IDENTIFIER_TRAITS: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.INSTITUTION_CREATE: EventSpec(
        APPLICATION_ACTIVITY, Action.CREATE, SOFTWARE_CONFIGURATION
    ),
    EventCode.INSTITUTION_UPDATE: EventSpec(
        APPLICATION_ACTIVITY, Action.UPDATE, SOFTWARE_CONFIGURATION
    ),
    EventCode.API_KEY_CREATE: EventSpec(
        SECURITY_ALERT, Action.CREATE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.API_KEY_REVOKE: EventSpec(
        SECURITY_ALERT, Action.DELETE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.API_KEY_REFUSED: EventSpec(USER_AUTHENTICATION, Action.EXECUTE, NODE_AUTHENTICATION),
    EventCode.DICOM_ASSOCIATION_REFUSED: EventSpec(
        SECURITY_ALERT, Action.EXECUTE, NODE_AUTHENTICATION
    ),
    EventCode.SIGNING_KEY_ROTATE: EventSpec(
        SECURITY_ALERT, Action.UPDATE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.HARVEST_START: EventSpec(IMPORT, Action.EXECUTE),
    EventCode.HARVEST_FINISH: EventSpec(IMPORT, Action.EXECUTE),
    EventCode.CONSENT_RECORD: EventSpec(PATIENT_RECORD, Action.CREATE),
    EventCode.CONSENT_WITHDRAW: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.CONSENT_AMEND: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.CONSENT_EVALUATE: EventSpec(PATIENT_RECORD, Action.EXECUTE),
    EventCode.CONSENT_READ: EventSpec(PATIENT_RECORD, Action.READ),
    EventCode.REQUEST_CREATE: EventSpec(PATIENT_RECORD, Action.CREATE),
    EventCode.REQUEST_APPROVE: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.REQUEST_DENY: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.REQUEST_CANCEL: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.REQUEST_EXPIRE: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.REQUEST_REVOKE: EventSpec(
        SECURITY_ALERT, Action.UPDATE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.REQUEST_READ: EventSpec(PATIENT_RECORD, Action.READ),
    EventCode.AVIS_ANSWER: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.ACCESS_DECIDE: EventSpec(PATIENT_RECORD, Action.EXECUTE),
    EventCode.TOKEN_ISSUE: EventSpec(PATIENT_RECORD, Action.EXECUTE),
    EventCode.TOKEN_REVOKE: EventSpec(
        SECURITY_ALERT, Action.DELETE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.TOKEN_INTROSPECT: EventSpec(USER_AUTHENTICATION, Action.EXECUTE),
    EventCode.SHIFT_CREATE: EventSpec(
        SECURITY_ALERT, Action.CREATE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.SHIFT_CANCEL: EventSpec(
        SECURITY_ALERT, Action.UPDATE, OBJECT_SECURITY_ATTRIBUTES_CHANGED
    ),
    EventCode.EMERGENCY_START: EventSpec(
        SECURITY_ALERT, Action.EXECUTE, EMERGENCY_OVERRIDE_STARTED
    ),
    EventCode.EMERGENCY_STOP: EventSpec(SECURITY_ALERT, Action.EXECUTE, EMERGENCY_OVERRIDE_STOPPED),
    EventCode.EMERGENCY_REVIEW: EventSpec(PATIENT_RECORD, Action.UPDATE),
    EventCode.TRANSFER_BEGIN: EventSpec(BEGIN_TRANSFERRING, Action.EXECUTE),
    EventCode.TRANSFER_END: EventSpec(INSTANCES_TRANSFERRED, Action.READ),
    EventCode.GATEWAY_QUERY: EventSpec(QUERY, Action.EXECUTE),
    EventCode.GATEWAY_METADATA: EventSpec(INSTANCES_ACCESSED, Action.READ),
    EventCode.GATEWAY_REFUSE: EventSpec(SECURITY_ALERT, Action.EXECUTE, USE_OF_RESTRICTED_FUNCTION),
    EventCode.AUDIT_VERIFY: EventSpec(AUDIT_LOG_USED, Action.READ),
    EventCode.AUDIT_EXPORT: EventSpec(AUDIT_LOG_USED, Action.READ),
}


def spec_for(code: EventCode) -> EventSpec:
    return EVENT_SPECS[code]

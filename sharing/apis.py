"""REST interface of sharing: tickets, the inbox, break-the-glass, tokens, duty shifts.

Thin views: a gate (``sharing.access``) finds what the caller may see, a service
(``sharing.services``) acts, a serializer shapes the answer. Tokens appear once, in the
body of the answer that issues them, with ``Cache-Control: no-store``; never in a URL.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.events import EventCode
from audit.services import audit_record
from broker.access import InstitutionSystem, actor_for
from broker.api.authentication import (
    InstitutionApiKeyAuthentication,
    InstitutionBasicAuthentication,
)
from broker.errors import NotFound, PermissionDenied
from broker.identity import patient_ref
from sharing import selectors, services
from sharing.access import (
    access_issued_token,
    access_patient_for_request,
    access_review,
    access_shift,
    access_ticket,
    acting_institution,
    dpo_scope,
    named_institution,
    named_professional,
    shift_scope,
)
from sharing.decision import REQUESTER_ROLES, break_the_glass_roles
from sharing.models import AccessRequest, DutyShift, EmergencyReview, Purpose, RequestState
from sharing.tokens import token_hash


class TicketOutput(serializers.ModelSerializer[AccessRequest]):
    id = serializers.UUIDField(source="public_id")
    patient = serializers.UUIDField(source="patient.public_id")
    source_institution = serializers.CharField(
        source="source_institution.finess", allow_null=True, default=None
    )
    requester = serializers.CharField(source="requester.user.get_username")
    requester_rpps = serializers.CharField(source="requester.rpps")
    requester_institution = serializers.CharField(source="requester_institution.finess")
    recipient = serializers.CharField(
        source="recipient.user.get_username", allow_null=True, default=None
    )
    recipient_institution = serializers.CharField(
        source="recipient_institution.finess", allow_null=True, default=None
    )
    decided_by = serializers.CharField(
        source="decided_by.user.get_username", allow_null=True, default=None
    )
    answered_by = serializers.CharField(
        source="answered_by.user.get_username", allow_null=True, default=None
    )
    shift = serializers.UUIDField(source="shift.public_id", allow_null=True, default=None)

    class Meta:
        model = AccessRequest
        fields = [
            "id",
            "purpose",
            "state",
            "patient",
            "all_studies",
            "studies",
            "source_institution",
            "requester",
            "requester_rpps",
            "requester_institution",
            "recipient",
            "recipient_institution",
            "question",
            "justification",
            "shift",
            "created_at",
            "decided_at",
            "decided_by",
            "decision_note",
            "automatic",
            "not_after",
            "ended_at",
            "end_reason",
            "answer",
            "answered_at",
            "answered_by",
        ]


class TokenOutput(serializers.Serializer[Any]):
    access_token = serializers.CharField()
    token_type = serializers.CharField(help_text="Bearer")
    expires_in = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    jti = serializers.UUIDField()
    studies = serializers.ListField(child=serializers.CharField())


class NoteInput(serializers.Serializer[Any]):
    note = serializers.CharField(max_length=4000, required=False, default="", allow_blank=True)


def _audit_read(request: Request, tickets: list[AccessRequest], what: str) -> None:
    """Reading tickets is reading patients' records: audited (one event per patient)."""
    with transaction.atomic():
        for ticket in tickets:
            audit_record(
                code=EventCode.REQUEST_READ,
                actor=actor_for(request),
                now=timezone.now(),
                patient=patient_ref(ticket.patient),
                objects=[{"type": "access-request", "id": str(ticket.public_id)}],
                correlation_id=ticket.public_id,
                purpose_of_use=ticket.purpose,
                details={"read": what},
            )


def _tickets(request: Request, tickets: list[AccessRequest], what: str) -> Response:
    _audit_read(request, tickets, what)
    return Response({"results": TicketOutput(tickets, many=True).data})


class RequestCollectionApi(APIView):
    class CreateInput(serializers.Serializer[Any]):
        purpose = serializers.ChoiceField(choices=sorted(REQUESTER_ROLES))
        patient = serializers.UUIDField()
        institution = serializers.CharField(
            max_length=9, required=False, default="", help_text="FINESS you act for"
        )
        studies = serializers.ListField(
            child=serializers.CharField(max_length=64),
            required=False,
            allow_null=True,
            default=None,
            max_length=500,
            help_text="Study Instance UIDs; omit (or null) for all the patient's studies",
        )
        source_institution = serializers.CharField(max_length=9, required=False, default="")
        recipient = serializers.CharField(
            max_length=11, required=False, default="", help_text="avis: the specialist's RPPS"
        )
        recipient_institution = serializers.CharField(
            max_length=9, required=False, default="", help_text="avis: the department's FINESS"
        )
        question = serializers.CharField(
            max_length=4000, required=False, default="", allow_blank=True
        )
        justification = serializers.CharField(max_length=4000)

    class ListInput(serializers.Serializer[Any]):
        state = serializers.ChoiceField(choices=RequestState.values, required=False)
        purpose = serializers.ChoiceField(choices=Purpose.values, required=False)

    @extend_schema(
        parameters=[ListInput],
        responses=inline_serializer("TicketList", {"results": TicketOutput(many=True)}),
        summary="The requests I made or received",
    )
    def get(self, request: Request) -> Response:
        filters = self.ListInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        professional = getattr(request.user, "professional", None)
        if professional is None:
            return _tickets(request, [], "list")
        tickets = selectors.tickets_of(professional=professional).filter(**filters.validated_data)[
            :200
        ]
        return _tickets(request, list(tickets), "list")

    @extend_schema(
        request=CreateInput, responses={201: TicketOutput}, summary="Ask for access (a ticket)"
    )
    def post(self, request: Request) -> Response:
        data = self.CreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        patient = access_patient_for_request(request.user, values["patient"])
        ticket = services.request_create(
            user=request.user,
            purpose=values["purpose"],
            patient=patient,
            institution=acting_institution(
                request.user, values["institution"], REQUESTER_ROLES[values["purpose"]]
            ),
            studies=values["studies"],
            justification=values["justification"],
            question=values["question"],
            recipient=named_professional(values["recipient"]),
            recipient_institution=named_institution(values["recipient_institution"]),
            source_institution=named_institution(values["source_institution"]),
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(TicketOutput(ticket).data, status=status.HTTP_201_CREATED)


class RequestDetailApi(APIView):
    @extend_schema(responses=TicketOutput, summary="One ticket", operation_id="v1_request_detail")
    def get(self, request: Request, ticket_id: uuid.UUID) -> Response:
        ticket = access_ticket(request.user, ticket_id)
        _audit_read(request, [ticket], "detail")
        return Response(TicketOutput(ticket).data)


class InboxApi(APIView):
    @extend_schema(
        responses=inline_serializer("Inbox", {"results": TicketOutput(many=True)}),
        summary="What waits for me: requests to approve or deny, avis to answer",
    )
    def get(self, request: Request) -> Response:
        return _tickets(request, list(selectors.inbox(user=request.user)[:200]), "inbox")


def _ticket_step(
    request: Request,
    ticket_id: uuid.UUID,
    input_class: type[serializers.Serializer[Any]],
    service: Any,
) -> Response:
    """One step of a ticket: the gate, the input (its fields are the service's keywords),
    the service, the ticket as it now is."""
    ticket = access_ticket(request.user, ticket_id)
    data = input_class(data=request.data)
    data.is_valid(raise_exception=True)
    ticket = service(
        user=request.user,
        ticket=ticket,
        actor=actor_for(request),
        now=timezone.now(),
        **data.validated_data,
    )
    return Response(TicketOutput(ticket).data)


class RequestApproveApi(APIView):
    @extend_schema(request=NoteInput, responses=TicketOutput, summary="Approve a request")
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        return _ticket_step(request, ticket_id, NoteInput, services.request_approve)


class RequestDenyApi(APIView):
    class DenyInput(serializers.Serializer[Any]):
        note = serializers.CharField(max_length=4000)

    @extend_schema(request=DenyInput, responses=TicketOutput, summary="Deny a request")
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        return _ticket_step(request, ticket_id, self.DenyInput, services.request_deny)


class RequestCancelApi(APIView):
    @extend_schema(
        request=NoteInput,
        responses=TicketOutput,
        summary="Cancel my request (ends a break-the-glass too)",
    )
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        return _ticket_step(request, ticket_id, NoteInput, services.request_cancel)


class RequestRevokeApi(APIView):
    class RevokeInput(serializers.Serializer[Any]):
        reason = serializers.CharField(max_length=4000)

    @extend_schema(
        request=RevokeInput,
        responses=TicketOutput,
        summary="Revoke an approved ticket and every token issued under it",
    )
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        return _ticket_step(request, ticket_id, self.RevokeInput, services.request_revoke)


class AvisAnswerApi(APIView):
    class AnswerInput(serializers.Serializer[Any]):
        answer = serializers.CharField(max_length=20000)

    @extend_schema(request=AnswerInput, responses=TicketOutput, summary="Answer an avis")
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        return _ticket_step(request, ticket_id, self.AnswerInput, services.avis_answer)


class TicketStoryApi(APIView):
    class EventOutput(serializers.Serializer[Any]):
        sequence = serializers.IntegerField()
        code = serializers.CharField()
        recorded_at = serializers.DateTimeField()
        outcome = serializers.IntegerField()
        actor_username = serializers.CharField()
        details = serializers.JSONField()

    @extend_schema(
        responses=inline_serializer("TicketStory", {"results": EventOutput(many=True)}),
        summary="Everything the ticket caused, from the audit trail (its correlation ID)",
    )
    def get(self, request: Request, ticket_id: uuid.UUID) -> Response:
        ticket = access_ticket(request.user, ticket_id)
        _audit_read(request, [ticket], "story")
        events = selectors.ticket_story(ticket=ticket)
        return Response({"results": self.EventOutput(events, many=True).data})


class TokenIssueApi(APIView):
    class IssueInput(serializers.Serializer[Any]):
        studies = serializers.ListField(
            child=serializers.CharField(max_length=64),
            required=False,
            allow_null=True,
            default=None,
            max_length=500,
            help_text="a subset of the ticket's studies; omit for all it permits",
        )

    @extend_schema(
        request=IssueInput,
        responses={201: TokenOutput},
        summary="A retrieval token for an approved ticket",
    )
    def post(self, request: Request, ticket_id: uuid.UUID) -> Response:
        ticket = access_ticket(request.user, ticket_id)
        data = self.IssueInput(data=request.data)
        data.is_valid(raise_exception=True)
        now = timezone.now()
        token, issued = services.token_issue_for_ticket(
            user=request.user,
            ticket=ticket,
            studies=data.validated_data["studies"],
            actor=actor_for(request),
            now=now,
        )
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int((issued.expires_at - now).total_seconds()),
            "expires_at": issued.expires_at,
            "jti": issued.token_id,
            "studies": issued.studies,
        }
        response = Response(TokenOutput(body).data, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response


class TokenRevokeApi(APIView):
    """Revoke one token, given the token itself (RFC 7009 style) or its ``jti``."""

    parser_classes = [JSONParser, FormParser]

    class TokenRevokeInput(serializers.Serializer[Any]):
        token = serializers.CharField(max_length=8192, required=False, default="")
        jti = serializers.UUIDField(required=False, allow_null=True, default=None)
        reason = serializers.CharField(max_length=64)

    @extend_schema(request=TokenRevokeInput, responses={204: None}, summary="Revoke a token")
    def post(self, request: Request) -> Response:
        data = self.TokenRevokeInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        if not values["token"] and values["jti"] is None:
            raise NotFound("No such token")
        issued = access_issued_token(
            request.user,
            token_id=values["jti"],
            sha256=token_hash(values["token"]) if values["token"] else "",
        )
        services.token_revoke(
            user=request.user,
            issued=issued,
            reason=values["reason"],
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class _InstitutionSystemOnly(IsAuthenticated):
    """Archives and gateways: an institution's system, by its API key."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.user, InstitutionSystem)


class TokenIntrospectApi(APIView):
    """RFC 7662 token introspection, for archives and gateways (an institution's API key,
    as ``Authorization: Api-Key`` or HTTP Basic FINESS:key)."""

    authentication_classes = [InstitutionApiKeyAuthentication, InstitutionBasicAuthentication]
    permission_classes = [_InstitutionSystemOnly]
    parser_classes = [FormParser, JSONParser]

    class IntrospectInput(serializers.Serializer[Any]):
        token = serializers.CharField(max_length=8192)
        token_type_hint = serializers.CharField(max_length=64, required=False)

    @extend_schema(
        request={
            "application/x-www-form-urlencoded": IntrospectInput,
            "application/json": IntrospectInput,
        },
        responses=inline_serializer(
            "Introspection",
            {
                "active": serializers.BooleanField(),
                "sub": serializers.CharField(required=False),
                "exp": serializers.IntegerField(required=False),
                "scope": serializers.CharField(required=False),
                "studies": serializers.ListField(child=serializers.CharField(), required=False),
                "ticket": serializers.CharField(required=False),
            },
        ),
        summary="Is this token active, and for what? (RFC 7662)",
    )
    def post(self, request: Request) -> Response:
        data = self.IntrospectInput(data=request.data)
        data.is_valid(raise_exception=True)
        answer = selectors.token_introspect(
            token=data.validated_data["token"],
            institution=request.user.institution,
            actor=actor_for(request),
            now=timezone.now(),
        )
        response = Response(answer)
        response["Cache-Control"] = "no-store"
        return response


class OrthancTokenValidateApi(APIView):
    """The web service of Orthanc's authorization plugin (``WebServiceRootUrl`` pointing at
    ``/api/v1/orthanc/``, ``WebServiceUsername``/``Password`` the FINESS and API key)."""

    authentication_classes = [InstitutionBasicAuthentication, InstitutionApiKeyAuthentication]
    permission_classes = [_InstitutionSystemOnly]
    parser_classes = [JSONParser]

    @extend_schema(
        request=inline_serializer(
            "OrthancValidate",
            {
                "dicom-uid": serializers.CharField(required=False),
                "level": serializers.CharField(required=False),
                "method": serializers.CharField(required=False),
                "orthanc-id": serializers.CharField(required=False),
                "token-key": serializers.CharField(required=False),
                "token-value": serializers.CharField(required=False),
            },
        ),
        responses=inline_serializer(
            "OrthancGrant",
            {"granted": serializers.BooleanField(), "validity": serializers.IntegerField()},
        ),
        summary="Orthanc authorization plugin: may this token reach this resource?",
    )
    def post(self, request: Request) -> Response:
        body = request.data if isinstance(request.data, dict) else {}
        answer = selectors.orthanc_validate(
            body={k: str(v) for k, v in body.items() if isinstance(v, str | int)},
            institution=request.user.institution,
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(answer)


class EmergencyApi(APIView):
    class StartInput(serializers.Serializer[Any]):
        patient = serializers.UUIDField()
        institution = serializers.CharField(max_length=9, required=False, default="")
        justification = serializers.CharField(max_length=4000)

    @extend_schema(
        request=StartInput,
        responses={201: TicketOutput},
        summary="Break-the-glass: emergency access to a patient's studies",
    )
    def post(self, request: Request) -> Response:
        data = self.StartInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        patient = access_patient_for_request(request.user, values["patient"])
        ticket = services.emergency_start(
            user=request.user,
            patient=patient,
            institution=acting_institution(
                request.user, values["institution"], break_the_glass_roles()
            ),
            justification=values["justification"],
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(TicketOutput(ticket).data, status=status.HTTP_201_CREATED)


class ReviewOutput(serializers.ModelSerializer[EmergencyReview]):
    ticket = TicketOutput(source="request")

    class Meta:
        model = EmergencyReview
        fields = ["id", "ticket", "created_at", "reviewed_at", "reviewed_by", "outcome", "comment"]


class EmergencyReviewCollectionApi(APIView):
    @extend_schema(
        responses=inline_serializer("ReviewList", {"results": ReviewOutput(many=True)}),
        summary="The DPO's queue of break-the-glass accesses",
    )
    def get(self, request: Request) -> Response:
        reviews = list(selectors.emergency_reviews(institution_ids=dpo_scope(request.user))[:200])
        _audit_read(request, [r.request for r in reviews], "emergency-review")
        return Response({"results": ReviewOutput(reviews, many=True).data})


class EmergencyReviewApi(APIView):
    class ReviewInput(serializers.Serializer[Any]):
        outcome = serializers.ChoiceField(choices=["justified", "unjustified"])
        comment = serializers.CharField(
            max_length=4000, required=False, default="", allow_blank=True
        )

    @extend_schema(request=ReviewInput, responses=ReviewOutput, summary="Review a break-the-glass")
    def post(self, request: Request, review_id: int) -> Response:
        review = access_review(request.user, review_id)
        data = self.ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        review = services.emergency_review(
            user=request.user,
            review=review,
            actor=actor_for(request),
            now=timezone.now(),
            **data.validated_data,
        )
        return Response(ReviewOutput(review).data)


class ShiftOutput(serializers.ModelSerializer[DutyShift]):
    id = serializers.UUIDField(source="public_id")
    teleradiologist = serializers.CharField(source="teleradiologist.user.get_username")
    institutions = serializers.SlugRelatedField(slug_field="finess", many=True, read_only=True)

    class Meta:
        model = DutyShift
        fields = [
            "id",
            "teleradiologist",
            "institutions",
            "starts_at",
            "ends_at",
            "agreement_reference",
            "created_by",
            "created_at",
            "cancelled_at",
            "cancelled_by",
        ]


class ShiftCollectionApi(APIView):
    class ShiftInput(serializers.Serializer[Any]):
        teleradiologist = serializers.CharField(max_length=11, help_text="RPPS")
        institutions = serializers.ListField(
            child=serializers.CharField(max_length=9), min_length=1, max_length=50
        )
        starts_at = serializers.DateTimeField()
        ends_at = serializers.DateTimeField()
        agreement_reference = serializers.CharField(max_length=128)

    @extend_schema(
        responses=inline_serializer("ShiftList", {"results": ShiftOutput(many=True)}),
        summary="Duty shifts of the institutions I administer",
    )
    def get(self, request: Request) -> Response:
        found = selectors.shifts(institution_ids=shift_scope(request.user))[:500]
        return Response({"results": ShiftOutput(found, many=True).data})

    @extend_schema(request=ShiftInput, responses={201: ShiftOutput}, summary="Plan a duty shift")
    def post(self, request: Request) -> Response:
        shift_scope(request.user)
        data = self.ShiftInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        teleradiologist = named_professional(values["teleradiologist"])
        if teleradiologist is None:
            raise PermissionDenied("No teleradiologist named")
        institutions = [named_institution(f) for f in values["institutions"]]
        shift = services.shift_create(
            user=request.user,
            teleradiologist=teleradiologist,
            institutions=[i for i in institutions if i is not None],
            starts_at=values["starts_at"],
            ends_at=values["ends_at"],
            agreement_reference=values["agreement_reference"],
            actor=actor_for(request),
            now=timezone.now(),
        )
        return Response(ShiftOutput(shift).data, status=status.HTTP_201_CREATED)


class ShiftCancelApi(APIView):
    @extend_schema(request=None, responses=ShiftOutput, summary="Cancel a duty shift")
    def post(self, request: Request, shift_id: uuid.UUID) -> Response:
        shift = access_shift(request.user, shift_id)
        shift = services.shift_cancel(
            user=request.user, shift=shift, actor=actor_for(request), now=timezone.now()
        )
        return Response(ShiftOutput(shift).data)

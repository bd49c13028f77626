"""Governance API viewsets: validate, call one service, render.

Each action's permission is declared in its viewset's ``permission_map`` and
enforced by ``GovernanceViewSet`` (see ``consortium.core.api.permissions``); lists and
lookups go through the selectors' ``*_visible_to`` querysets.
"""

from __future__ import annotations

from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.core.api.schema import ErrorSerializer
from consortium.governance import selectors
from consortium.governance.api import filters, serializers
from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Consortium,
    Institution,
    Invitation,
    Membership,
)
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_sign,
    agreement_version_publish,
    agreement_version_update,
)
from consortium.governance.services.institutions import institution_create, institution_update
from consortium.governance.services.members import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    membership_change_role,
    membership_remove,
)
from consortium.governance.services.withdrawals import consent_withdraw

_NOT_FOUND = OpenApiResponse(ErrorSerializer, description="Not found or not allowed.")
_INVALID = OpenApiResponse(
    ErrorSerializer, description="Invalid input: `{field: [messages]}` or `{detail, code}`."
)
_CONFLICT = OpenApiResponse(ErrorSerializer, description="Conflicts with the current state.")


@extend_schema_view(
    list=extend_schema(summary="Consortia you are a member of"),
    retrieve=extend_schema(
        summary="One consortium", responses={200: serializers.ConsortiumSerializer, 404: _NOT_FOUND}
    ),
)
class ConsortiumViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = Consortium.objects.all()
    serializer_class = serializers.ConsortiumSerializer
    lookup_field = "slug"
    permission_map = {"list": VISIBLE, "retrieve": "consortium.view_consortium"}

    def visible_queryset(self, user):
        return selectors.consortia_visible_to(user)


@extend_schema_view(
    list=extend_schema(summary="Institutions of your consortia"),
    retrieve=extend_schema(
        summary="One institution",
        responses={200: serializers.InstitutionSerializer, 404: _NOT_FOUND},
    ),
)
class InstitutionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = Institution.objects.all()
    serializer_class = serializers.InstitutionSerializer
    filterset_class = filters.InstitutionFilter
    lookup_field = "slug"
    permission_map = {
        "list": VISIBLE,
        "retrieve": "consortium.view_institution",
        "create": "consortium.add_institution",
        "partial_update": "consortium.change_institution",
    }
    input_targets = {"create": "consortium"}

    def visible_queryset(self, user):
        return selectors.institutions_visible_to(user)

    @extend_schema(
        summary="Add an institution (consortium administrators)",
        request=serializers.InstitutionCreateSerializer,
        responses={
            201: serializers.InstitutionSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    def create(self, request):
        data = self.validated_input(serializers.InstitutionCreateSerializer)
        institution = institution_create(acting_user=request.user, **data)
        return Response(self.get_serializer(institution).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Change an institution's details or the worker key on file for new credentials",
        request=serializers.InstitutionUpdateSerializer,
        responses={
            200: serializers.InstitutionSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    def partial_update(self, request, slug=None):
        institution = self.get_object()
        data = self.validated_input(serializers.InstitutionUpdateSerializer)
        institution = institution_update(acting_user=request.user, institution=institution, **data)
        return Response(self.get_serializer(institution).data)


@extend_schema_view(
    list=extend_schema(summary="Memberships in your consortia"),
    retrieve=extend_schema(
        summary="One membership", responses={200: serializers.MembershipSerializer, 404: _NOT_FOUND}
    ),
)
class MembershipViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = Membership.objects.all()
    serializer_class = serializers.MembershipSerializer
    filterset_class = filters.MembershipFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "consortium.view_members",
        "partial_update": "consortium.manage_membership",
        "destroy": "consortium.manage_membership",
    }

    def visible_queryset(self, user):
        return selectors.memberships_visible_to(user)

    @extend_schema(
        summary="Change a member's role",
        request=serializers.MembershipRoleSerializer,
        responses={
            200: serializers.MembershipSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    def partial_update(self, request, pk=None):
        membership = self.get_object()
        data = self.validated_input(serializers.MembershipRoleSerializer)
        membership = membership_change_role(
            acting_user=request.user, membership=membership, role=data["role"]
        )
        return Response(self.get_serializer(membership).data)

    @extend_schema(
        summary="Remove a member (the last administrator cannot be removed)",
        responses={204: None, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    def destroy(self, request, pk=None):
        membership = self.get_object()
        membership_remove(acting_user=request.user, membership=membership)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    list=extend_schema(summary="Invitations of your consortia"),
    retrieve=extend_schema(
        summary="One invitation", responses={200: serializers.InvitationSerializer, 404: _NOT_FOUND}
    ),
)
class InvitationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = Invitation.objects.all()
    serializer_class = serializers.InvitationSerializer
    filterset_class = filters.InvitationFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "consortium.view_members",
        # As on the pages: consortium roles need the consortium's right, institution
        # roles the institution's (the role decides which object the body names).
        "create": {
            Consortium: "consortium.invite_to_consortium",
            Institution: "consortium.invite_to_institution",
        },
        "revoke": "consortium.revoke_invitation",
        # Anyone signed in may accept an invitation sent to their own address.
        "accept": VISIBLE,
    }
    input_targets = {"create": ("institution", "consortium")}

    def visible_queryset(self, user):
        return selectors.invitations_visible_to(user)

    @extend_schema(
        summary="Invite someone by email (the token goes by email, never in the response)",
        request=serializers.InvitationCreateSerializer,
        responses={
            201: serializers.InvitationSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    def create(self, request):
        data = self.validated_input(serializers.InvitationCreateSerializer)
        invitation, _token = invitation_create(acting_user=request.user, **data)
        return Response(self.get_serializer(invitation).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Revoke a pending invitation",
        request=None,
        responses={200: serializers.InvitationSerializer, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        invitation = invitation_revoke(acting_user=request.user, invitation=self.get_object())
        return Response(self.get_serializer(invitation).data)

    @extend_schema(
        summary="Accept an invitation sent to your email address",
        request=serializers.InvitationAcceptSerializer,
        responses={
            201: serializers.MembershipSerializer,
            400: _INVALID,
            404: OpenApiResponse(
                ErrorSerializer,
                description="The token matches no invitation (invitation_invalid).",
            ),
            409: _CONFLICT,
        },
    )
    @action(detail=False, methods=["post"])
    def accept(self, request):
        data = self.validated_input(serializers.InvitationAcceptSerializer)
        membership = invitation_accept(token=data["token"], user=request.user)
        return Response(
            serializers.MembershipSerializer(membership).data, status=status.HTTP_201_CREATED
        )


@extend_schema_view(
    list=extend_schema(summary="Agreements of your consortia, with their versions"),
    retrieve=extend_schema(
        summary="One agreement and whether it is in force",
        responses={200: serializers.AgreementDetailSerializer, 404: _NOT_FOUND},
    ),
)
class AgreementViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = Agreement.objects.all()
    serializer_class = serializers.AgreementSerializer
    filterset_class = filters.AgreementFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "consortium.view_agreement",
        "create": "consortium.manage_agreements",
        "amend": "consortium.manage_agreements",
        "withdraw": "consortium.withdraw_consent",
    }
    input_targets = {"create": "consortium", "withdraw": "institution"}

    def visible_queryset(self, user):
        return selectors.agreements_visible_to(user).prefetch_related(
            Prefetch("versions", queryset=AgreementVersion.objects.order_by("-number"))
        )

    def get_serializer_class(self):
        if self.action == "retrieve":
            return serializers.AgreementDetailSerializer
        return serializers.AgreementSerializer

    @extend_schema(
        summary="Draft a new agreement (its first version is a draft)",
        request=serializers.AgreementCreateSerializer,
        responses={201: serializers.AgreementDetailSerializer, 400: _INVALID, 404: _NOT_FOUND},
    )
    def create(self, request):
        data = self.validated_input(serializers.AgreementCreateSerializer)
        version = agreement_create(acting_user=request.user, **data)
        agreement = self.visible_queryset(request.user).get(pk=version.agreement_id)
        return Response(
            serializers.AgreementDetailSerializer(
                agreement, context=self.get_serializer_context()
            ).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(
        summary="Open an amendment: a new draft version from the current terms",
        request=None,
        responses={201: serializers.AgreementVersionSerializer, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def amend(self, request, pk=None):
        version = agreement_amend(acting_user=request.user, agreement=self.get_object())
        return Response(
            serializers.AgreementVersionSerializer(version).data, status=status.HTTP_201_CREATED
        )

    @extend_schema(
        summary="Withdraw an institution's consent under this agreement",
        request=serializers.WithdrawSerializer,
        responses={
            201: serializers.WithdrawalSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def withdraw(self, request, pk=None):
        agreement = self.get_object()
        data = self.validated_input(serializers.WithdrawSerializer)
        withdrawal = consent_withdraw(
            acting_user=request.user,
            agreement=agreement,
            institution=data["institution"],
            reason=data["reason"],
        )
        return Response(
            serializers.WithdrawalSerializer(withdrawal).data, status=status.HTTP_201_CREATED
        )


@extend_schema_view(
    list=extend_schema(summary="Agreement versions (without their full text)"),
    retrieve=extend_schema(
        summary="One version with its full text and digest",
        responses={200: serializers.AgreementVersionSerializer, 404: _NOT_FOUND},
    ),
)
class AgreementVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    queryset = AgreementVersion.objects.all()
    serializer_class = serializers.AgreementVersionSerializer
    filterset_class = filters.AgreementVersionFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "consortium.view_agreement",
        "partial_update": "consortium.manage_agreements",
        "publish": "consortium.manage_agreements",
        "sign": "consortium.sign_agreement",
    }
    input_targets = {"sign": "institution"}

    def visible_queryset(self, user):
        return selectors.versions_visible_to(user)

    def get_serializer_class(self):
        if self.action == "list":
            return serializers.AgreementVersionListSerializer
        return serializers.AgreementVersionSerializer

    @extend_schema(
        summary="Edit a draft version (published versions are immutable)",
        request=serializers.AgreementVersionUpdateSerializer,
        responses={
            200: serializers.AgreementVersionSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    def partial_update(self, request, pk=None):
        version = self.get_object()
        data = self.validated_input(serializers.AgreementVersionUpdateSerializer)
        version = agreement_version_update(acting_user=request.user, version=version, **data)
        return Response(self.get_serializer(version).data)

    @extend_schema(
        summary="Publish a draft: freeze it and record its digest",
        request=None,
        responses={
            200: serializers.AgreementVersionSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def publish(self, request, pk=None):
        version = agreement_version_publish(acting_user=request.user, version=self.get_object())
        return Response(self.get_serializer(version).data)

    @extend_schema(
        summary="Sign this version for your institution (approvers)",
        request=serializers.SignSerializer,
        responses={
            201: serializers.SignatureSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def sign(self, request, pk=None):
        version = self.get_object()
        data = self.validated_input(serializers.SignSerializer)
        signature = agreement_sign(
            acting_user=request.user,
            version=version,
            institution=data["institution"],
            typed_name=data["typed_name"],
            confirmed=data["confirmed"],
            expected_digest=data["content_digest"],
        )
        return Response(
            serializers.SignatureSerializer(signature).data, status=status.HTTP_201_CREATED
        )

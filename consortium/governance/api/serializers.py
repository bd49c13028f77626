"""Serializers for the governance API.

Input serializers only check the shape of a request (types, choices, lengths);
the rules about state live in ``consortium.governance.services``, which the views call.
Output serializers name their fields explicitly, so the schema says exactly
what a client gets. Objects named in a body (by slug) are looked up among those
the user may see, so an unknown slug and a hidden one give the same error.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from consortium.governance import selectors
from consortium.governance.models import (
    CONSORTIUM_ROLES,
    INSTITUTION_ROLES,
    Agreement,
    AgreementVersion,
    Consortium,
    DPMechanism,
    FinalModelAccess,
    Institution,
    Invitation,
    Membership,
    ModelFamily,
    Role,
)
from consortium.governance.services.institutions import key_fingerprint

INVITATION_STATUSES = ["pending", "accepted", "revoked", "expired"]

# --- Fields --------------------------------------------------------------------------


class VisibleSlugField(serializers.SlugRelatedField):
    """A slug among the objects the requesting user may see.

    ``queryset`` only tells the schema the model; lookups go through the
    selector, so objects outside the user's consortia read as nonexistent.
    """

    def __init__(self, selector, **kwargs):
        self.selector = selector
        kwargs.setdefault("slug_field", "slug")
        super().__init__(**kwargs)

    def get_queryset(self):
        return self.selector(self.context["request"].user)


def consortium_field(**kwargs) -> VisibleSlugField:
    return VisibleSlugField(
        selectors.consortia_visible_to,
        queryset=Consortium.objects.all(),
        help_text="The consortium's slug.",
        **kwargs,
    )


def institution_field(**kwargs) -> VisibleSlugField:
    return VisibleSlugField(
        selectors.institutions_visible_to,
        queryset=Institution.objects.all(),
        help_text="The institution's slug.",
        **kwargs,
    )


# --- Consortia and institutions --------------------------------------------------------


class ConsortiumSerializer(serializers.ModelSerializer):
    class Meta:
        model = Consortium
        fields = ["slug", "name", "description", "created_at"]
        read_only_fields = fields


class SigningKeySerializer(serializers.Serializer):
    """One active worker credential's public key (``selectors.active_credentials_of``)."""

    label = serializers.CharField(help_text="The credential's label.")
    token_prefix = serializers.CharField(help_text="The first characters of its API token.")
    fingerprint = serializers.CharField(
        help_text="The first 16 hex digits of the SHA-256 of its Ed25519 public key (PEM)."
    )


class _InstitutionListSerializer(serializers.ListSerializer):
    """Reads the active credentials of a whole page of institutions in one query."""

    def to_representation(self, data):
        institutions = list(data.all() if hasattr(data, "all") else data)
        self.child.active_credentials = selectors.active_credentials_of(
            [i.pk for i in institutions]
        )
        return super().to_representation(institutions)


class InstitutionSerializer(serializers.ModelSerializer):
    """An institution. Its site workers sign their updates with the keys of their active
    worker credentials (``signing_keys``), which is what the central side verifies uploads
    against and what the pages show as the worker key; ``worker_public_key`` is only the key
    on file that a new credential takes when none is pasted."""

    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    signing_keys = serializers.SerializerMethodField(
        help_text=(
            "The keys the consortium verifies this site's updates against: one per active "
            "(unrevoked) worker credential, newest first. Empty when no worker of the site "
            "can upload a signed update. Worker credentials are created and revoked on the "
            "institution's site workers page."
        )
    )
    worker_key_registered = serializers.SerializerMethodField(
        help_text=(
            "True when the site has at least one active worker credential (signing_keys is "
            "not empty): what the pages show as 'Worker key: registered'."
        )
    )
    worker_key_fingerprint = serializers.SerializerMethodField(
        help_text=(
            "Fingerprint of worker_public_key, the key on file that a new worker credential "
            "takes when none is pasted; empty when none is on file. Not the key updates are "
            "verified against (see signing_keys): a site may sign with credentials and have "
            "no key on file, or have a key on file and no active credential."
        )
    )

    class Meta:
        model = Institution
        list_serializer_class = _InstitutionListSerializer
        fields = [
            "slug",
            "name",
            "consortium",
            "country",
            "worker_public_key",
            "worker_key_fingerprint",
            "signing_keys",
            "worker_key_registered",
            "created_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "worker_public_key": {
                "help_text": (
                    "The Ed25519 public key (PEM) on file: the default a new worker "
                    "credential takes when none is pasted. Updates are verified against "
                    "the active credentials' keys (signing_keys), not this one."
                )
            }
        }

    def _credentials(self, obj: Institution) -> tuple[selectors.ActiveCredential, ...]:
        found = getattr(self, "active_credentials", None)
        if found is None or obj.pk not in found:
            found = selectors.active_credentials_of([obj.pk])
        return found[obj.pk]

    @extend_schema_field(SigningKeySerializer(many=True))
    def get_signing_keys(self, obj: Institution) -> list[dict]:
        return [
            {
                "label": c.label,
                "token_prefix": c.token_prefix,
                "fingerprint": key_fingerprint(c.public_key),
            }
            for c in self._credentials(obj)
        ]

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_worker_key_registered(self, obj: Institution) -> bool:
        return bool(self._credentials(obj))

    @extend_schema_field(OpenApiTypes.STR)
    def get_worker_key_fingerprint(self, obj: Institution) -> str:
        return key_fingerprint(obj.worker_public_key)


class InstitutionCreateSerializer(serializers.Serializer):
    consortium = consortium_field()
    name = serializers.CharField(max_length=200)
    slug = serializers.SlugField(max_length=64, required=False, allow_blank=True, default="")
    country = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    worker_public_key = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        help_text=(
            "An Ed25519 public key (PEM) to keep on file: the default a new worker credential "
            "takes when none is pasted. It does not by itself let a worker upload: that needs "
            "an active worker credential (signing_keys)."
        ),
    )


class InstitutionUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False)
    country = serializers.CharField(max_length=64, required=False, allow_blank=True)
    worker_public_key = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text=(
            "The Ed25519 public key (PEM) on file for new worker credentials; empty removes "
            "it. Credentials already issued keep their own keys (signing_keys)."
        ),
    )


# --- Memberships and invitations --------------------------------------------------------


class MembershipSerializer(serializers.ModelSerializer):
    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    institution = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    full_name = serializers.CharField(source="user.get_full_name", read_only=True)

    class Meta:
        model = Membership
        fields = [
            "id",
            "consortium",
            "institution",
            "role",
            "user_id",
            "username",
            "full_name",
            "created_at",
        ]
        read_only_fields = fields


class MembershipRoleSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices)


class InvitationSerializer(serializers.ModelSerializer):
    """An invitation as members see it. The token is never returned: it goes to
    the invitee by email, and only its hash is stored."""

    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    institution = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    invited_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    status = serializers.ChoiceField(choices=INVITATION_STATUSES, read_only=True)

    class Meta:
        model = Invitation
        fields = [
            "id",
            "consortium",
            "institution",
            "email",
            "role",
            "status",
            "invited_by",
            "created_at",
            "expires_at",
            "accepted_at",
            "revoked_at",
        ]
        read_only_fields = fields


class InvitationCreateSerializer(serializers.Serializer):
    consortium = consortium_field()
    institution = institution_field(
        required=False,
        allow_null=True,
        default=None,
    )
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices)

    def validate(self, attrs):
        # Decided here, before the permission check, because the role decides
        # whose permission is needed (the consortium's or the institution's).
        role, institution = attrs["role"], attrs.get("institution")
        if role in CONSORTIUM_ROLES and institution is not None:
            raise serializers.ValidationError(
                {"institution": f"{Role(role).label} is a consortium-wide role: leave it empty."}
            )
        if role in INSTITUTION_ROLES and institution is None:
            raise serializers.ValidationError(
                {"institution": f"{Role(role).label} belongs to an institution: name one."}
            )
        return attrs


class InvitationAcceptSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="The token from the invitation email.")


# --- Agreements ---------------------------------------------------------------------------


class TermsInputSerializer(serializers.Serializer):
    """An agreement version's terms; every field is required unless ``partial``."""

    purpose = serializers.CharField()
    permitted_model_families = serializers.ListField(
        child=serializers.ChoiceField(choices=ModelFamily.choices), allow_empty=False, min_length=1
    )
    max_shared_fraction = serializers.DecimalField(max_digits=4, decimal_places=3)
    required_dp_mechanism = serializers.ChoiceField(choices=DPMechanism.choices)
    epsilon_cap = serializers.DecimalField(max_digits=8, decimal_places=3)
    delta = serializers.DecimalField(max_digits=12, decimal_places=10)
    allows_central_validation_set = serializers.BooleanField(
        required=False,
        help_text="An institution's data steward may send records to the consortium's server "
        "for central validation. Left out: false on a new agreement, unchanged on an edit.",
    )
    final_model_access = serializers.ChoiceField(
        choices=FinalModelAccess.choices,
        required=False,
        help_text="Who may download a job's models (the final model above all): "
        "'participants_and_admins' (members of the institutions still taking part in the job "
        "and the consortium's administrators), 'participants' (those members only) or "
        "'nobody' (the models stay on the consortium's server). Left out: "
        "'participants_and_admins' on a new agreement, unchanged on an edit.",
    )
    privacy_audit_required = serializers.BooleanField(
        required=False,
        help_text="Before an institution approves a job, its own site worker attacks the update "
        "the job would send (under the job's privacy pipeline, on a few of the site's records) "
        "and reports only the figures. True: every job must ask for this privacy audit and no "
        "institution approves before its own audit is in. Left out: false on a new agreement, "
        "unchanged on an edit.",
    )
    audit_max_median_ssim = serializers.DecimalField(
        max_digits=4,
        decimal_places=3,
        required=False,
        allow_null=True,
        help_text="The highest median SSIM (similarity between a site's image records and what "
        "the audit's attacks rebuild of them: 1 is an exact copy, around 0.3 a reconstruction "
        "is hard to recognise) an institution may approve; above 0 and at most 1. It applies "
        "to image records (a tabular audit measures no SSIM). Needs privacy_audit_required. "
        "Left out: none on a new agreement, unchanged on an edit; null removes it.",
    )
    audit_max_success_rate = serializers.DecimalField(
        max_digits=4,
        decimal_places=3,
        required=False,
        allow_null=True,
        help_text="The highest success rate (the share of a site's audited records that the "
        "audit's attacks rebuild, 0 to 1) an institution may approve. Needs "
        "privacy_audit_required. Left out: none on a new agreement, unchanged on an edit; null "
        "removes it.",
    )
    valid_from = serializers.DateField()
    valid_until = serializers.DateField()
    text = serializers.CharField(trim_whitespace=False)


class AgreementCreateSerializer(TermsInputSerializer):
    consortium = consortium_field()
    title = serializers.CharField(max_length=200)


class AgreementVersionUpdateSerializer(TermsInputSerializer):
    """Edit a draft: send only the terms that change."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.required = False


class VersionSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = AgreementVersion
        fields = ["id", "number", "status", "content_digest", "published_at"]
        read_only_fields = fields


class AgreementSerializer(serializers.ModelSerializer):
    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    versions = VersionSummarySerializer(many=True, read_only=True)

    class Meta:
        model = Agreement
        fields = ["id", "consortium", "title", "created_at", "versions"]
        read_only_fields = fields


class AgreementStatusSerializer(serializers.Serializer):
    """``selectors.agreement_status``: whether the agreement is in force and why not."""

    in_force = serializers.BooleanField()
    reasons = serializers.ListField(child=serializers.CharField())
    current_version = serializers.IntegerField(
        allow_null=True, help_text="Number of the latest published version."
    )
    current_version_id = serializers.IntegerField(allow_null=True)
    signed = serializers.ListField(child=serializers.SlugField(), help_text="Institution slugs.")
    unsigned = serializers.ListField(child=serializers.SlugField(), help_text="Institution slugs.")
    withdrawn = serializers.ListField(child=serializers.SlugField(), help_text="Institution slugs.")

    @staticmethod
    def from_status(status: selectors.AgreementStatus) -> dict:
        return {
            "in_force": status.in_force,
            "reasons": status.reasons,
            "current_version": status.version.number if status.version else None,
            "current_version_id": status.version.pk if status.version else None,
            "signed": [s.institution.slug for s in status.signed],
            "unsigned": [i.slug for i in status.unsigned],
            "withdrawn": [w.institution.slug for w in status.withdrawn],
        }


class AgreementDetailSerializer(AgreementSerializer):
    status = serializers.SerializerMethodField()

    class Meta(AgreementSerializer.Meta):
        fields = [*AgreementSerializer.Meta.fields, "status"]
        read_only_fields = fields

    @extend_schema_field(AgreementStatusSerializer)
    def get_status(self, obj: Agreement) -> dict:
        return AgreementStatusSerializer.from_status(selectors.agreement_status(obj))


class WithdrawSerializer(serializers.Serializer):
    institution = institution_field()
    reason = serializers.CharField(help_text="Recorded in the ledger (at least 10 characters).")


class WithdrawalSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    agreement = serializers.IntegerField(source="agreement_id")
    institution = serializers.SlugField(source="institution.slug")
    reason = serializers.CharField()
    withdrawn_by = serializers.CharField(source="withdrawn_by_repr")
    withdrawn_at = serializers.DateTimeField()


_VERSION_FIELDS = [
    "id",
    "agreement",
    "number",
    "status",
    "purpose",
    "permitted_model_families",
    "max_shared_fraction",
    "required_dp_mechanism",
    "epsilon_cap",
    "delta",
    "allows_central_validation_set",
    "final_model_access",
    "privacy_audit_required",
    "audit_max_median_ssim",
    "audit_max_success_rate",
    "valid_from",
    "valid_until",
    "content_digest",
    "created_at",
    "published_at",
]


class AgreementVersionListSerializer(serializers.ModelSerializer):
    agreement = serializers.PrimaryKeyRelatedField(read_only=True)
    permitted_model_families = serializers.ListField(
        child=serializers.ChoiceField(choices=ModelFamily.choices), read_only=True
    )

    class Meta:
        model = AgreementVersion
        fields = _VERSION_FIELDS
        read_only_fields = fields


class AgreementVersionSerializer(AgreementVersionListSerializer):
    """A version with its full text: what an approver reads before signing."""

    class Meta(AgreementVersionListSerializer.Meta):
        fields = [*_VERSION_FIELDS, "text"]
        read_only_fields = fields


class SignSerializer(serializers.Serializer):
    institution = institution_field()
    typed_name = serializers.CharField(
        max_length=200, help_text="Your full name, exactly as on your account."
    )
    confirmed = serializers.BooleanField(
        help_text="You have read this version and sign on behalf of the institution."
    )
    content_digest = serializers.CharField(
        max_length=64,
        help_text="The content_digest of the version you read; a changed text is refused.",
    )


class SignatureSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    version = serializers.IntegerField(source="version_id")
    institution = serializers.SlugField(source="institution.slug")
    typed_name = serializers.CharField()
    content_digest = serializers.CharField()
    signed_at = serializers.DateTimeField()

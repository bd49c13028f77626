"""Forms of the governance pages. They check types and shapes only; the rules
(who may, what is allowed, what conflicts) live in ``services``, whose errors the
views put back on these forms."""

from __future__ import annotations

from django import forms

from consortium.governance.models import (
    CONSORTIUM_ROLES,
    INSTITUTION_ROLES,
    AgreementVersion,
    APITokenScope,
    DPMechanism,
    FinalModelAccess,
    Institution,
    ModelFamily,
    Role,
)

PEM_HELP = (
    "Optional. An Ed25519 public key, PEM-encoded ('-----BEGIN PUBLIC KEY-----' ...), kept on "
    "file as the key a new worker credential takes when none is pasted. It does not let a "
    "worker upload by itself: a site's workers sign their updates with the keys of their "
    "worker credentials, created and revoked on the site's Worker credentials page."
)
#: The label of the key on file, as the institution's page names it.
KEY_ON_FILE_LABEL = "Key on file for new worker credentials (PEM)"


def _role_choices(roles) -> list[tuple[str, str]]:
    return [(value, label) for value, label in Role.choices if value in roles]


class DateInput(forms.DateInput):
    input_type = "date"


class ConsortiumStartForm(forms.Form):
    """The operator's form: a new consortium and its first administrator's address."""

    name = forms.CharField(max_length=200)
    slug = forms.SlugField(
        max_length=64,
        required=False,
        help_text="In the consortium's addresses. Leave empty to derive it from the name.",
    )
    description = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="Optional."
    )
    admin_email = forms.EmailField(
        label="First administrator's email",
        help_text="Invited as the consortium's administrator: they add the institutions and "
        "invite everyone else.",
    )


class InstitutionCreateForm(forms.Form):
    name = forms.CharField(max_length=200)
    slug = forms.SlugField(
        max_length=64,
        required=False,
        help_text="Names the site's worker queue (site.<slug>). Leave empty to derive it "
        "from the name. It cannot change later.",
    )
    country = forms.CharField(max_length=64, required=False)
    worker_public_key = forms.CharField(
        label=KEY_ON_FILE_LABEL,
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "class": "mono"}),
        help_text=PEM_HELP,
    )


class InstitutionUpdateForm(forms.Form):
    name = forms.CharField(max_length=200)
    country = forms.CharField(max_length=64, required=False)
    worker_public_key = forms.CharField(
        label=KEY_ON_FILE_LABEL,
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "class": "mono"}),
        help_text=PEM_HELP
        + " Empty it to remove the key on file; credentials already created keep their keys.",
    )


class InvitationForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField()
    institution = forms.ModelChoiceField(
        queryset=Institution.objects.none(),
        required=False,
        empty_label="— none (consortium-wide role) —",
        help_text="Required for institution roles; leave empty for administrator and auditor.",
    )

    def __init__(self, *args, roles, institutions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = [("", "— choose a role —"), *_role_choices(roles)]
        self.fields["institution"].queryset = institutions


class MembershipRoleForm(forms.Form):
    role = forms.ChoiceField()

    def __init__(self, *args, membership, **kwargs):
        super().__init__(*args, **kwargs)
        roles = INSTITUTION_ROLES if membership.institution_id else CONSORTIUM_ROLES
        self.fields["role"].choices = _role_choices(roles)


class NewAccountForm(forms.Form):
    username = forms.CharField(max_length=150)
    full_name = forms.CharField(
        max_length=200, help_text="As you will type it when you sign an agreement."
    )
    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}), strip=False
    )
    password_confirm = forms.CharField(
        label="Password (again)",
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        strip=False,
    )

    def clean(self):
        data = super().clean()
        if (
            data.get("password")
            and data.get("password_confirm")
            and data["password"] != data["password_confirm"]
        ):
            self.add_error("password_confirm", "The two passwords differ.")
        return data


class AgreementTermsForm(forms.Form):
    """The terms of one agreement version, as ``services.TERM_FIELDS``."""

    purpose = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What models trained under this agreement may be used for.",
    )
    permitted_model_families = forms.MultipleChoiceField(
        choices=ModelFamily.choices, widget=forms.CheckboxSelectMultiple
    )
    max_shared_fraction = forms.DecimalField(
        label="Maximum shared fraction",
        max_digits=4,
        decimal_places=3,
        help_text=AgreementVersion._meta.get_field("max_shared_fraction").help_text,
    )
    required_dp_mechanism = forms.ChoiceField(
        label="Required differential-privacy mechanism", choices=DPMechanism.choices
    )
    epsilon_cap = forms.DecimalField(
        label="ε cap per institution",
        max_digits=8,
        decimal_places=3,
        help_text=AgreementVersion._meta.get_field("epsilon_cap").help_text,
    )
    delta = forms.DecimalField(
        label="δ",
        max_digits=12,
        decimal_places=10,
        help_text=AgreementVersion._meta.get_field("delta").help_text,
    )
    allows_central_validation_set = forms.BooleanField(
        label="Allow a central validation set",
        required=False,
        help_text=AgreementVersion._meta.get_field("allows_central_validation_set").help_text
        + " Leave unticked and no record ever leaves a site.",
    )
    final_model_access = forms.ChoiceField(
        label="Who may download the final model",
        choices=FinalModelAccess.choices,
        initial=FinalModelAccess.PARTICIPANTS_AND_ADMINS,
        # Not required: a form posted without it (an older page) means the default on a new
        # agreement and "unchanged" on an edit, as the API does (clean_final_model_access).
        required=False,
        widget=forms.RadioSelect,
        help_text=AgreementVersion._meta.get_field("final_model_access").help_text
        + ' Choose "Nobody" to keep every model on the consortium\'s server.',
    )
    privacy_audit_required = forms.BooleanField(
        label="Require each site's privacy audit before approval",
        required=False,
        help_text=AgreementVersion._meta.get_field("privacy_audit_required").help_text,
    )
    audit_max_median_ssim = forms.DecimalField(
        label="Highest median SSIM an institution may approve (optional)",
        max_digits=4,
        decimal_places=3,
        required=False,
        help_text=AgreementVersion._meta.get_field("audit_max_median_ssim").help_text
        + " A maximum needs the audit: tick the box above too.",
    )
    audit_max_success_rate = forms.DecimalField(
        label="Highest audit success rate an institution may approve (optional)",
        max_digits=4,
        decimal_places=3,
        required=False,
        help_text=AgreementVersion._meta.get_field("audit_max_success_rate").help_text
        + " A maximum needs the audit: tick the box above too.",
    )
    valid_from = forms.DateField(widget=DateInput)
    valid_until = forms.DateField(widget=DateInput)
    text = forms.CharField(
        label="Full text",
        widget=forms.Textarea(attrs={"rows": 14}),
        help_text="The full text the institutions sign.",
    )

    TERM_NAMES = (
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
        "text",
    )

    def clean_final_model_access(self):
        # Left out: None, which the services read as the default (new) or unchanged (edit).
        return self.cleaned_data.get("final_model_access") or None

    def terms(self) -> dict:
        return {name: self.cleaned_data[name] for name in self.TERM_NAMES}

    @classmethod
    def initial_from(cls, version: AgreementVersion) -> dict:
        return {name: getattr(version, name) for name in cls.TERM_NAMES}


class AgreementCreateForm(AgreementTermsForm):
    title = forms.CharField(max_length=200)
    field_order = ["title", *AgreementTermsForm.TERM_NAMES]


class SignForm(forms.Form):
    institution = forms.ModelChoiceField(
        queryset=Institution.objects.none(),
        label="Sign on behalf of",
        empty_label=None,
    )
    typed_name = forms.CharField(
        label="Your full name",
        max_length=200,
        help_text="Type your name exactly as it appears on your account.",
    )
    confirmed = forms.BooleanField(required=False)
    expected_digest = forms.CharField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args, institutions, confirm_label: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["institution"].queryset = institutions
        self.fields["confirmed"].label = confirm_label


class WithdrawForm(forms.Form):
    institution = forms.ModelChoiceField(
        queryset=Institution.objects.none(),
        label="Withdraw the consent of",
        empty_label=None,
    )
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        help_text="At least 10 characters. The reason is recorded in the ledger.",
    )

    def __init__(self, *args, institutions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["institution"].queryset = institutions


#: The lifetimes offered for a new API token, in days (capped by ``API_TOKEN_MAX_DAYS``).
API_TOKEN_LIFETIMES = (7, 30, 90)


class APITokenForm(forms.Form):
    """A new personal API token: what it is for, what it may do, how long it lives."""

    name = forms.CharField(
        max_length=100,
        help_text="What it is for, e.g. 'analysis notebook'.",
    )
    scope = forms.ChoiceField(
        choices=APITokenScope.choices,
        initial=APITokenScope.READ,
        widget=forms.RadioSelect,
        help_text="A read-only token may only read (GET); changes need 'Read and act'.",
    )
    days = forms.TypedChoiceField(coerce=int, label="Expires after")

    def __init__(self, *args, max_days: int, **kwargs):
        super().__init__(*args, **kwargs)
        days = sorted({d for d in API_TOKEN_LIFETIMES if d <= max_days} | {max_days})
        self.fields["days"].choices = [(d, f"{d} day{'s' if d != 1 else ''}") for d in days]
        self.fields["days"].initial = 30 if 30 in days else max_days


class SecondFactorCodeForm(forms.Form):
    """A code from the authenticator app (six digits) or one of the backup codes."""

    code = forms.CharField(
        max_length=32,
        label="Code",
        help_text="The six digits your authenticator app shows now, or a backup code.",
        widget=forms.TextInput(
            attrs={"autocomplete": "one-time-code", "inputmode": "text", "autofocus": True}
        ),
    )


class CurrentPasswordForm(forms.Form):
    """The account's current password, asked again before the second factor is changed."""

    password = forms.CharField(
        label="Current password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

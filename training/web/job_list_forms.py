"""The GET forms of the jobs list and the comparison page.

Both read the address bar, so a value can be anything a person typed or an old link kept:
each field says in words what it could not use, and the page goes on with what it could. The
choices offered come from selectors scoped to the user, so nobody is offered an institution
or a job they may not see.
"""

from __future__ import annotations

from django import forms

from training.jobs import selectors
from training.models import JobState


class JobFilterForm(forms.Form):
    """Which jobs the list shows: one participant institution, one state, or both."""

    participant = forms.ModelChoiceField(
        queryset=None,
        required=False,
        to_field_name="slug",
        empty_label="Any participant",
        label="Participant",
        error_messages={
            "invalid_choice": "No institution “%(value)s” took part in a job you can see: "
            "the list shows every participant."
        },
    )
    state = forms.ChoiceField(
        choices=[("", "All states"), *JobState.choices],
        required=False,
        label="State",
        error_messages={
            "invalid_choice": "“%(value)s” is not a job state: the list shows every state."
        },
    )

    def __init__(self, data, *, user, consortium):
        super().__init__(data)
        self.fields["participant"].queryset = selectors.job_participant_choices(
            user, consortium=consortium
        )

    def filters(self) -> dict:
        """The filters that could be used (an unusable one is left out, and its error says
        so): ``{"participant": Institution or None, "state": str}``."""
        self.is_valid()
        cleaned = getattr(self, "cleaned_data", {})
        return {"participant": cleaned.get("participant"), "state": cleaned.get("state") or ""}

    def query(self) -> dict:
        """The usable filters as GET parameters, for the pager's links (so paging keeps them)."""
        used = self.filters()
        query = {}
        if used["participant"] is not None:
            query["participant"] = used["participant"].slug
        if used["state"]:
            query["state"] = used["state"]
        return query


class JobNumberField(forms.IntegerField):
    """A job's number from the address bar; what is not one is quoted back in the error
    (Django's own "Enter a whole number." does not say which of the two it was)."""

    def __init__(self, label: str):
        super().__init__(
            label=label,
            min_value=1,
            # The largest id the database can hold: beyond it a lookup would fail, not miss.
            max_value=2**63 - 1,
            required=False,
            error_messages={
                "min_value": "job numbers start at 1.",
                "max_value": "no job has a number that large.",
            },
        )

    def to_python(self, value):
        try:
            return super().to_python(value)
        except forms.ValidationError:
            raise forms.ValidationError(
                "“%(value)s” is not a job number.", code="invalid", params={"value": value}
            ) from None


class JobCompareForm(forms.Form):
    """The two jobs to compare (``a`` and ``b``). Only their numbers are checked here; whether
    the user may see them is the page's lookup (a job they may not see is a 404, exactly like
    a missing one).

    ``a`` alone (no ``b`` in the address at all, as the job page's "Compare with another job"
    link sends it) is valid: the page shows that job and asks for the second one. A ``b`` that
    was sent empty (the picker submitted without a second job) is still a mistake to point out.
    """

    a = JobNumberField("First job")
    b = JobNumberField("Second job")

    def __init__(self, data=None, *, user, consortium):
        super().__init__(data)
        jobs = (
            selectors.jobs_visible_to(user)
            .filter(consortium=consortium)
            .order_by("-created_at", "-pk")
            .values_list("pk", "title", "state")
        )
        states = dict(JobState.choices)
        choices = [("", "Choose a job")] + [
            (pk, f"#{pk} {title} ({states.get(state, state).lower()})") for pk, title, state in jobs
        ]
        self.fields["a"].widget = forms.Select(choices=choices)
        # The job already chosen as A is not offered as B: a job compared with itself says nothing.
        first = str((data or {}).get("a", "")).strip()
        self.fields["b"].widget = forms.Select(
            choices=[c for c in choices if not first or str(c[0]) != first]
        )

    @property
    def awaits_second(self) -> bool:
        """Whether only the first job was asked for (``?a=<id>``, no ``b``): the page shows it
        and the picker for the second one. Only meaningful once the form is valid."""
        return self.cleaned_data.get("b") is None

    def clean(self):
        cleaned = super().clean()
        first, second = cleaned.get("a"), cleaned.get("b")
        if "a" in self.errors or "b" in self.errors:
            return cleaned
        if first is None and second is None:
            raise forms.ValidationError("Choose the two jobs to compare.")
        if second is None and first is not None and "b" not in self.data:
            return cleaned
        if first is None or second is None:
            raise forms.ValidationError(
                f"Choose a second job to compare with job #{first or second}."
            )
        if first == second:
            raise forms.ValidationError(
                f"Choose two different jobs: job #{first} was chosen twice."
            )
        return cleaned

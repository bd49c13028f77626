"""The auditor's ledger filters."""

from __future__ import annotations

import datetime as dt

from django import forms
from django.utils import timezone


class LedgerFilterForm(forms.Form):
    """Filters for one consortium's entries. Choices come from that consortium only."""

    event = forms.ChoiceField(label="Event", required=False)
    institution = forms.ChoiceField(label="Institution", required=False)
    date_from = forms.DateField(
        label="From (date)",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="Entries on or after this day (UTC).",
    )
    date_to = forms.DateField(
        label="To (date)",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="Entries on or before this day (UTC).",
    )

    def __init__(self, *args, events=(), institutions=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["event"].choices = [("", "All events")] + [(e, e) for e in events]
        self.fields["institution"].choices = [("", "All institutions")] + [
            (s, s) for s in institutions
        ]

    def clean(self):
        data = super().clean()
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            raise forms.ValidationError("The 'from' date must not be after the 'to' date.")
        return data

    def filter(self, queryset):
        """Apply the valid filters; an invalid form filters nothing it cannot read."""
        data = self.cleaned_data if self.is_valid() else {}
        if data.get("event"):
            queryset = queryset.filter(event=data["event"])
        if data.get("institution"):
            queryset = queryset.filter(institution_slug=data["institution"])
        # Day bounds as datetimes, so the created_at index serves the range.
        if data.get("date_from"):
            queryset = queryset.filter(created_at__gte=_start_of(data["date_from"]))
        if data.get("date_to"):
            end = data["date_to"] + dt.timedelta(days=1)
            queryset = queryset.filter(created_at__lt=_start_of(end))
        return queryset


def _start_of(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=timezone.get_current_timezone())

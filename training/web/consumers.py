"""The live pages' websockets: a job's page and the consortium dashboard.

See :class:`consortium.core.live.LedgerLiveConsumer` for the protocol: each consumer names its
page's object, the page's permission rule, the channel group :mod:`audit.ledger.live` wakes, which
ledger entries concern the page, and the state the page redraws from.
"""

from __future__ import annotations

import json

from audit.ledger import live
from consortium.core.access import may
from consortium.core.live import LedgerLiveConsumer
from consortium.governance.models import Consortium, Institution
from training.models import TrainingJob
from training.rounds.live import consortium_live_state
from training.rounds.waiting import job_page_state


class _NamesInstitutions:
    """The consortium's institutions by slug, for the entries' words."""

    def institution_names(self, target) -> dict[str, str]:
        slug = self.consortium_slug_of(target)
        return dict(Institution.objects.filter(consortium__slug=slug).values_list("slug", "name"))


class JobLiveConsumer(_NamesInstitutions, LedgerLiveConsumer):
    """``/ws/consortia/<slug>/jobs/<pk>/``: rounds, site updates, state changes, budget warnings."""

    def load_target(self):
        kwargs = self.scope["url_route"]["kwargs"]
        return (
            TrainingJob.objects.select_related("consortium")
            .filter(pk=kwargs["pk"], consortium__slug=kwargs["slug"])
            .first()
        )

    def allowed(self, user, target) -> bool:
        return may(user, "training.view_job", target)

    def groups_of(self, target) -> list[str]:
        return [live.job_group(target.pk)]

    def consortium_slug_of(self, target) -> str:
        return target.consortium.slug

    def relevant(self, entry, target) -> bool:
        # Entries about the job carry its id at the top of the payload (every service and the
        # coordinator write it); the text test only spares parsing the others.
        if f'"job_id":{target.pk}' not in entry.payload_text:
            return False
        return json.loads(entry.payload_text).get("job_id") == target.pk

    def state_of(self, target) -> dict:
        # With what the job waits on, in words; the page asks for a fresh state every
        # half-minute while it runs (heartbeats write no ledger entry to wake it).
        return job_page_state(target)


class ConsortiumLiveConsumer(_NamesInstitutions, LedgerLiveConsumer):
    """``/ws/consortia/<slug>/``: jobs by state, approvals awaited, recent ledger entries."""

    def load_target(self):
        return Consortium.objects.filter(slug=self.scope["url_route"]["kwargs"]["slug"]).first()

    def allowed(self, user, target) -> bool:
        return may(user, "consortium.view_consortium", target)

    def groups_of(self, target) -> list[str]:
        return [live.consortium_group(target.slug)]

    def consortium_slug_of(self, target) -> str:
        return target.slug

    def shows_entries(self, user, target) -> bool:
        # The ledger's entries are the auditors' and administrators' page; others see the state.
        return may(user, "audit.view_ledger", target)

    def relevant(self, entry, target) -> bool:
        return True

    def state_of(self, target) -> dict:
        return consortium_live_state(target)

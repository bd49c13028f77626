"""The consortium dashboard's server-side table (django-tables2): sorted and paged by query
string, so a link shows the same rows to everyone and nothing depends on JavaScript."""

from __future__ import annotations

import django_tables2 as tables
from django.urls import reverse

#: Rows per page of the consortium's institutions.
INSTITUTIONS_PER_PAGE = 25

_BADGE = '<span class="badge {{ value.tone }}">{{ value.label }}</span>'
_WORKER = '{% include "training/_site_worker.html" with workers=value compact=True %}'
# ``value`` is the site's ``consortium.dashboard.worker_keys.WorkerKeys``: "registered" when a
# worker credential (whose key its uploads are verified against) is active.
_KEY = (
    '{% if value.registered %}<span class="badge ok" data-worker-key="registered">registered'
    "</span>{% else %}"
    '<span class="badge warn" data-worker-key="missing">missing</span>{% endif %}'
)


class InstitutionTable(tables.Table):
    """The consortium dashboard's institutions, with their standing under each agreement (one
    column per agreement, added by :meth:`for_dashboard`). Rows are dicts from the view:
    ``{"institution", "name", "country", "worker_key", "worker", "standing_<n>"...}``;
    ``worker_key`` is the site's workers' signing keys
    (``consortium.dashboard.worker_keys.WorkerKeys``), ``missing`` only without an active
    worker credential;
    ``worker`` is the site's workers (``training.rounds.heartbeats.SiteWorkers``): online or
    since when not."""

    name = tables.Column(
        verbose_name="Institution",
        linkify=lambda record: reverse(
            "consortium:institution-detail",
            args=[record["institution"].consortium.slug, record["institution"].slug],
        ),
    )
    country = tables.Column(default="—")
    worker_key = tables.TemplateColumn(
        _KEY, verbose_name="Worker key", order_by=("worker_key_order",)
    )
    worker = tables.TemplateColumn(_WORKER, verbose_name="Site worker", order_by=("worker_order",))

    class Meta:
        # htmx boosts only the search form, the sort links (the thead) and the pager (the
        # template), which swap the table's block in place (hx-select of that block, set on the
        # dashboard). A boosted link to another page would swap in nothing from a page without
        # the table, so the links to an institution's page are left plain links.
        attrs = {"id": "institutions", "thead": {"hx-boost": "true"}}
        template_name = "consortium/_institutions_table.html"
        order_by = ("name",)
        empty_text = "No institutions match."

    @classmethod
    def for_dashboard(cls, rows: list[dict], agreement_titles: list[str], request):
        extra = [
            (
                f"standing_{i}",
                tables.TemplateColumn(_BADGE, verbose_name=title, order_by=(f"standing_{i}_key",)),
            )
            for i, title in enumerate(agreement_titles)
        ]
        table = cls(rows, extra_columns=extra, request=request)
        table.paginate(page=request.GET.get("page", 1), per_page=INSTITUTIONS_PER_PAGE)
        return table

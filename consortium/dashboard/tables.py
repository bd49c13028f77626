"""The consortium dashboard's server-side table (django-tables2): sorted and paged by query
string, so a link shows the same rows to everyone and nothing depends on JavaScript.

Why the cells are rendered here, in one pass, and not by django-tables2's own cell path: that
path costs about 0.1 ms a cell (an accessor walk, an ``inspect.signature`` of the column's
``render`` on every cell, the column's attributes), and its ``TemplateColumn`` compiles its
``template_code`` afresh for every cell; at 25 rows of five columns that was a third of the
dashboard's time at 100 institutions (docs/performance.md, "Pages"). django-tables2 still
sorts, pages and draws the header and the pager; :meth:`InstitutionTable.render_page_cells`
renders the current page's cells with each column's :meth:`~DashboardColumn.cell`, in the order
of ``table.columns``, and the table's template prints them (the markup is the one
django-tables2 drew).
"""

from __future__ import annotations

from typing import Any

import django_tables2 as tables
from django.template.loader import get_template
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

#: Rows per page of the consortium's institutions.
INSTITUTIONS_PER_PAGE = 25

_SITE_WORKER = "training/_site_worker.html"


class DashboardColumn(tables.Column):
    """A column whose cell is ``cell(value, record)``: what :meth:`InstitutionTable.
    render_page_cells` calls for each row on the page (``render`` says the same to
    django-tables2, for any other use of the table)."""

    empty_values = ()  # every row has a value (the view's dicts)

    def cell(self, value: Any, record: dict) -> SafeString | str:
        raise NotImplementedError

    def render(self, value, record):
        return self.cell(value, record)


class InstitutionNameColumn(DashboardColumn):
    """The institution's name, a link to its page."""

    def cell(self, value, record):
        institution = record["institution"]
        url = reverse(
            "consortium:institution-detail", args=[institution.consortium.slug, institution.slug]
        )
        return format_html('<a href="{}">{}</a>', url, value)


class TextColumn(DashboardColumn):
    """Plain text (escaped when printed), or a dash when empty."""

    def cell(self, value, record):
        return value if value not in (None, "") else "—"


class BadgeColumn(DashboardColumn):
    """An institution's standing under an agreement (``value``: the view's ``{"tone",
    "label"}``), as a badge."""

    def cell(self, value, record):
        return format_html('<span class="badge {}">{}</span>', value["tone"], value["label"])


class WorkerKeyColumn(DashboardColumn):
    """``value`` is the site's ``consortium.dashboard.worker_keys.WorkerKeys``: "registered" when
    a worker credential (whose key its uploads are verified against) is active."""

    def cell(self, value, record):
        if value.registered:
            return mark_safe(
                '<span class="badge ok" data-worker-key="registered">registered</span>'
            )
        return mark_safe('<span class="badge warn" data-worker-key="missing">missing</span>')


class SiteWorkerColumn(DashboardColumn):
    """The site's workers (``training.rounds.heartbeats.SiteWorkers``) on one line: online, or
    since when not: the shared ``training/_site_worker.html`` in its compact form."""

    def cell(self, value, record):
        return get_template(_SITE_WORKER).render({"workers": value, "compact": True})


class InstitutionTable(tables.Table):
    """The consortium dashboard's institutions, with their standing under each agreement (one
    column per agreement, added by :meth:`for_dashboard`). Rows are dicts from the view:
    ``{"institution", "name", "country", "worker_key", "worker", "standing_<n>"...}``;
    ``worker_key`` is the site's workers' signing keys
    (``consortium.dashboard.worker_keys.WorkerKeys``), ``missing`` only without an active
    worker credential;
    ``worker`` is the site's workers (``training.rounds.heartbeats.SiteWorkers``): online or
    since when not. Each column is a :class:`DashboardColumn`."""

    name = InstitutionNameColumn(verbose_name="Institution")
    country = TextColumn()
    worker_key = WorkerKeyColumn(verbose_name="Worker key", order_by=("worker_key_order",))
    worker = SiteWorkerColumn(verbose_name="Site worker", order_by=("worker_order",))

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
                BadgeColumn(verbose_name=title, order_by=(f"standing_{i}_key",)),
            )
            for i, title in enumerate(agreement_titles)
        ]
        table = cls(rows, extra_columns=extra, request=request)
        table.paginate(page=request.GET.get("page", 1), per_page=INSTITUTIONS_PER_PAGE)
        table.render_page_cells()
        return table

    def render_page_cells(self) -> None:
        """Render the cells of the rows on the current page into each row's dict (``"cells"``,
        in the order of ``self.columns``), for the template to print (see the module's
        docstring for why). The other pages' rows are sorted, never rendered."""
        columns = [(bound.name, bound.column) for bound in self.columns]
        # The page's records themselves: iterating its rows would make BoundRows, and count
        # them (the rows' even/odd classes come from that count).
        for record in self.page.object_list.data:
            record["cells"] = [column.cell(record[name], record) for name, column in columns]

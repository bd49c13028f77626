"""Which DP mechanisms a report's privacy figures rest on, read from the ledger at its head.

A contribution report states ε per institution; an auditor (and issue 15's "honest guarantees")
also needs to know what that ε rests on: DP-SGD, Gaussian or Laplace noise on the update, the
sparse vector technique. The accepted updates' ``privacy_events`` in the ledger name the filter
each event came from, so the mechanisms are read from there, up to the report's head, like every
other figure; the words are :func:`training.jobs.guarantees.mechanism_name`'s (the review page's).

They are not a field of the report's records (the CSV and JSON keep their schema): the PDF prints
them, and ``verify_report`` renders the PDF again from the same ledger and head, so the printed
words are checked like the rest of its pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from audit.ledger import events as ledger_events
from audit.ledger.selectors import consortium_entry_rows
from training.jobs.accounting import PrivacyEvent
from training.jobs.guarantees import mechanism_name

__all__ = ["report_mechanisms"]


def report_mechanisms(
    consortium_slug: str, *, up_to: int, job_ids: Iterable[int]
) -> dict[int, list[str]]:
    """Per job of ``job_ids``: the mechanisms of its accepted updates' privacy events up to
    entry ``up_to``, in words, in the order first met (empty: no DP mechanism was spent).

    An event that cannot be read is left out here: the report's own replay of the same events
    already fails with the entry's number (:mod:`audit.reports.spend`)."""
    wanted = set(job_ids)
    found: dict[int, list[str]] = {job_id: [] for job_id in wanted}
    rows = consortium_entry_rows(
        consortium_slug, up_to=up_to, events=[ledger_events.UPDATE_ACCEPTED], chunk_size=2000
    )
    for row in rows:
        try:
            payload = json.loads(row.payload_text)
        except ValueError:
            continue
        if not isinstance(payload, dict) or payload.get("job_id") not in wanted:
            continue
        names = found[payload["job_id"]]
        for data in payload.get("privacy_events") or []:
            try:
                name = mechanism_name(PrivacyEvent.from_json(data))
            except (KeyError, TypeError, ValueError):
                continue
            if name not in names:
                names.append(name)
    return found

"""Who may read and verify the ledger and export contribution reports (``rules`` permissions).

The predicates (``is_auditor``, ``is_consortium_admin``, ...) are governance's: they read the
memberships computed in :mod:`consortium.governance.permissions`. The permissions over the
ledger and the reports are audit's, so they are registered here, when the audit app is ready
(:meth:`audit.apps.AuditConfig.ready`). Their names keep the ``audit.`` prefix they have always
had: pages, viewsets and tests check them by these strings.
"""

from __future__ import annotations

import rules

from consortium.governance.permissions import (
    is_approver,
    is_auditor,
    is_consortium_admin,
    is_institution_admin,
)

# The ledger: obj is the consortium.
rules.add_perm("audit.view_ledger", is_auditor | is_consortium_admin)
rules.add_perm("audit.verify_ledger", is_auditor | is_consortium_admin)

# Contribution reports (built from the ledger; exporting one is itself a ledger entry).
# A job's report covers every participant: obj is the job; auditors and the consortium's admins.
rules.add_perm("audit.export_job_report", is_auditor | is_consortium_admin)
# An institution's own report: obj is the institution; also its approvers and administrators,
# who answer for its data, but not other institutions' members.
rules.add_perm(
    "audit.export_institution_report",
    is_auditor | is_consortium_admin | is_approver | is_institution_admin,
)

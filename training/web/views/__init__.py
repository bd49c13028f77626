"""Pages for site data sets, training jobs, approvals, notifications and the
site workers' credentials.

Each view is thin, like the governance pages: it loads its object through a
selector scoped to the user (``consortium.core.pages`` checks the declared
permission and answers a forbidden object with the same 404 as a missing one),
validates a form, calls one service with ``acting_user=request.user``, shows a
message and redirects. A refused form is re-rendered with exactly what was typed.

One module per area (``training.urls`` routes them): :mod:`~training.web.views.datasets`,
:mod:`~training.web.views.jobs`, :mod:`~training.web.views.approvals`,
:mod:`~training.web.views.notifications` and :mod:`~training.web.views.credentials`;
:mod:`~training.web.views.mixins` loads the institution or job a page is about.
"""

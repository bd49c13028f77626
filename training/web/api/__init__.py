"""REST API for site data sets, training jobs, approvals and notifications.

Built on the governance API's mechanisms (``consortium.core.api.permissions``): every
viewset derives from ``GovernanceViewSet`` and names each action's permission in
its ``permission_map`` (rules from ``training.jobs.permissions``); lookups go through
``training.jobs.selectors``' ``*_visible_to`` querysets, so a missing object and a
forbidden one give the same 404. Views validate with an input serializer, call
one service with ``acting_user=request.user`` and render with an output
serializer whose fields are named explicitly.

A job that breaks the agreement is refused with 409 and the problems the
compliance check found (``{"detail", "code": "not_compliant", "problems":
[{"term", "institution", "message"}]}``); a malformed spec is 400 with
``{"spec": ["path: message", ...]}``.

One module per resource (``training.api_urls`` registers their viewsets):
:mod:`~training.web.api.datasets`, :mod:`~training.web.api.jobs`,
:mod:`~training.web.api.approvals` (decisions and the approver's inbox) and
:mod:`~training.web.api.notifications`; :mod:`~training.web.api.responses` holds the error
responses they document.
"""

"""Daphne hands request bodies to Django unread: Twisted's form parsing switched off.

Daphne's requests are Twisted's ``http.Request``, which by default parses every POST body
sent as ``multipart/form-data`` or ``application/x-www-form-urlencoded`` into ``request.args``,
a dictionary Daphne never reads (it passes the raw body to the application, and Django parses
it). That costs a second copy of every form upload in memory, and a multipart body Twisted's
parser cannot read is answered by Twisted itself: a bare ``400`` with no body, no content type
and none of the security headers, which the API's clients and its schema cannot expect
(found by fuzzing ``POST /api/validation-sets/`` with an empty multipart body). With the
parsing off, such a body reaches Django, which answers it in the API's error shape.

:func:`leave_bodies_to_django` is called from ``consortium.asgi`` when Daphne is the server
(its module is loaded by then); under another server it does nothing.
"""

from __future__ import annotations

import sys


def leave_bodies_to_django() -> None:
    http_protocol = sys.modules.get("daphne.http_protocol")
    if http_protocol is None:
        return
    request_class = http_protocol.WebRequest
    if getattr(request_class, "_bodies_left_to_django", False):
        return
    original_init = request_class.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        # Twisted's own switch (twisted.web.http.Request, parsePOSTFormSubmission): read in
        # requestReceived, after __init__.
        self._parsePOSTFormSubmission = False

    request_class.__init__ = __init__
    request_class._bodies_left_to_django = True

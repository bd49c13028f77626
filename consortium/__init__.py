"""The Django project package: settings, URLconfs, ASGI/WSGI, websocket routing, the Celery
app and the health check. The governance app lives in ``consortium.governance`` and the base
library every app builds on in ``consortium.core`` (see docs/architecture.md). Importing this
package loads the Celery app so that ``shared_task`` binds to it."""

from consortium.celery import app as celery_app

__all__ = ["celery_app"]

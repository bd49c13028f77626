"""The Django project package and the governance app (consortia, institutions,
memberships, data-use agreements). Importing it loads the Celery app so that
``shared_task`` binds to it."""

from .celery import app as celery_app

__all__ = ["celery_app"]

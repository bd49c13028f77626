"""Celery tasks of the training app. Tasks take ids, not objects, and call one
service; queue names live in ``training.queues``."""

from celery import shared_task

from . import services
from .queues import CENTRAL_QUEUE


@shared_task(name="training.expire_overdue_jobs", queue=CENTRAL_QUEUE, ignore_result=True)
def expire_overdue_jobs() -> int:
    """Expire jobs whose approval deadline passed (scheduled by Celery beat)."""
    return services.jobs_expire_overdue()

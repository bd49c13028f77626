"""Celery tasks of the training app. Tasks take ids, not objects, and call one
service; queue names live in ``training.queues`` and routes in settings."""

from celery import shared_task

from . import services


@shared_task(name="training.expire_overdue_jobs", ignore_result=True)
def expire_overdue_jobs() -> int:
    """Expire jobs whose approval deadline passed (scheduled by Celery beat)."""
    return services.jobs_expire_overdue()

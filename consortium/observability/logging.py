"""Log records as JSON lines (``LOG_FORMAT=json``), for a log shipper to read without parsing.

Each record is one JSON object on one line on standard error: ``time`` (ISO 8601, UTC),
``level``, ``logger``, ``message``, then every field the call passed in ``extra`` (``job_id``,
``round``, ``site``...), ``exc_info`` with the traceback when there is one, and in a Celery
task ``task_id`` and ``task_name``. The formatting is python-json-logger's; this module only
says which fields and where.

Settings apply it (:func:`json_logging`) to every process that loads them: the web server,
the coordinator and beat (``celery -A consortium``), and the site workers
(``manage.py run_site_worker`` loads the settings too). A Celery worker replaces the root
logger's handlers with its own text format unless told not to, so the settings also set
``CELERY_WORKER_HIJACK_ROOT_LOGGER = False`` with it, and configure Celery's task and pool
loggers here, which Celery then leaves as they are (it adds a handler only to a logger that
has none). The default, ``LOG_FORMAT=text``, keeps the human format.
"""

from __future__ import annotations

import copy
import logging

__all__ = ["JSON_FORMATTER", "CeleryTaskFields", "json_logging"]

#: dictConfig's description of the JSON formatter.
JSON_FORMATTER = {
    "()": "pythonjsonlogger.json.JsonFormatter",
    "fmt": "%(levelname)s %(name)s %(message)s",
    "rename_fields": {"levelname": "level", "name": "logger"},
    "timestamp": "time",
}

#: Loggers Celery would give a text handler of its own when they have none.
CELERY_LOGGERS = ("celery.task", "multiprocessing")


class CeleryTaskFields(logging.Filter):
    """Adds ``task_id`` and ``task_name`` to a record logged inside a Celery task (what
    Celery's own task format shows), so a coordinator's lines can be followed per task."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery import current_task  # on use: the settings load this module early

        if current_task and getattr(current_task.request, "id", None):
            record.__dict__.setdefault("task_id", current_task.request.id)
            record.__dict__.setdefault("task_name", current_task.name)
        return True


def json_logging(config: dict) -> dict:
    """``config`` (a ``LOGGING`` dictConfig) with every handler writing JSON lines to standard
    error, and Celery's own loggers sent to them (see the module's docstring)."""
    config = copy.deepcopy(config)
    config.setdefault("formatters", {})["json"] = dict(JSON_FORMATTER)
    config.setdefault("filters", {})["celery_task"] = {"()": CeleryTaskFields}
    handlers = config.setdefault("handlers", {})
    if not handlers:
        handlers["console"] = {"class": "logging.StreamHandler"}
    for handler in handlers.values():
        handler["formatter"] = "json"
        handler["filters"] = [*handler.get("filters", []), "celery_task"]
        if handler.get("class") == "logging.StreamHandler":
            handler["stream"] = "ext://sys.stderr"
    root_handlers = config.get("root", {}).get("handlers") or list(handlers)
    loggers = config.setdefault("loggers", {})
    for name in CELERY_LOGGERS:
        loggers.setdefault(name, {"handlers": root_handlers, "propagate": False})
    return config

"""The Celery application. Queue names live in ``training.queues``."""

import os
from pathlib import Path

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
# The embedded broker writes each message aside and renames it into place (consortium.broker):
# kombu's own filesystem transport lets a consumer read a message before it is written.
TRANSPORT_ALIASES["filesystem"] = "consortium.broker:Transport"

app = Celery("consortium")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _create_filesystem_broker_folders(sender, source=None, **kwargs):
    """kombu's filesystem transport expects its folders to exist.

    After configuration, not on it: reading ``sender.conf`` inside ``on_configure`` starts
    the configuration again (a RecursionError the signal dispatcher only logs)."""
    options = (source if source is not None else sender.conf).broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)

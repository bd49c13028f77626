"""The embedded broker: kombu's filesystem transport, with messages that appear whole.

kombu's ``filesystem`` transport (5.x) creates a message file under its final name and only
then writes into it, while a consumer moves and reads any file with that name without taking
the lock: a consumer that polls in between reads an empty message, and the Celery worker stops
with an unrecoverable ``JSONDecodeError``. With a web process, beat and site workers sending
while the coordinator consumes (``manage.py demo``), that happens within minutes.

Here a message is written under a name no consumer matches (``.tmp-*``: kombu takes the queue
from the part after the first dot) and renamed to its final name in the same folder, which is
atomic, so a consumer sees the whole message or none. ``consortium.celery`` registers this
transport under the ``filesystem`` alias, so ``CELERY_BROKER_URL=filesystem://`` uses it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["Channel", "Transport"]


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put ``payload`` onto ``queue``: written aside, then renamed into place."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb", buffering=0) as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

"""Websocket routes: one socket per live page, at the page's own path under ``/ws/``."""

from django.urls import path

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from training.web.consumers import ConsortiumLiveConsumer, JobLiveConsumer

websocket_urlpatterns = [
    path("ws/consortia/<slug:slug>/", ConsortiumLiveConsumer.as_asgi(), name="live-consortium"),
    path("ws/consortia/<slug:slug>/jobs/<id:pk>/", JobLiveConsumer.as_asgi(), name="live-job"),
]

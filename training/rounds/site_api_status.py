"""The site API's endpoints about the worker itself rather than a job (served with the others
by ``training.rounds.site_api``, under ``/api/site/v1/``):

* ``GET  datasets/`` -- the data sets the site registered, as its worker must find them under
  ``DATA_ROOT`` (``run_site_worker --check`` compares shape and records);
* ``POST heartbeat/`` -- the worker is online, with its release, device and host
  (``training.rounds.heartbeats``); the pages then show it online or since when it is not.

Kept apart from the job endpoints so that neither module grows past one reading.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from training.models import SiteDataset
from training.rounds.heartbeats import online_window, worker_heartbeat_record
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import (
    HeartbeatResultSerializer,
    HeartbeatSerializer,
    SiteDatasetSerializer,
    SiteErrorSerializer,
)

__all__ = ["HeartbeatView", "SiteDatasetsView"]

_401 = OpenApiResponse(
    SiteErrorSerializer,
    description="No site token, or an invalid or revoked one (also for a browser session).",
)
_426 = OpenApiResponse(
    SiteErrorSerializer,
    description="The request states no site protocol, or one this server does not speak "
    "(`detail` says which side to upgrade).",
)


class SiteDatasetsView(SiteAPIView):
    """The data sets this site registered, as its worker must find them under DATA_ROOT."""

    @extend_schema(
        tags=["site"],
        summary="The data sets this site registered (to check the local files against)",
        responses={200: SiteDatasetSerializer(many=True), 401: _401, 426: _426},
    )
    def get(self, request):
        datasets = SiteDataset.objects.filter(
            institution_id=self.credential.institution_id
        ).order_by("key")
        return Response(SiteDatasetSerializer(datasets, many=True).data)


class HeartbeatView(SiteAPIView):
    """The worker says it is online (at start, then every ``SITE_HEARTBEAT_SECONDS``)."""

    @extend_schema(
        tags=["site"],
        summary="Report that this site's worker is online: its release, device and host",
        request=HeartbeatSerializer,
        responses={
            200: HeartbeatResultSerializer,
            400: OpenApiResponse(
                SiteErrorSerializer, description="A field is missing or malformed."
            ),
            401: _401,
            426: _426,
        },
    )
    def post(self, request):
        report = HeartbeatSerializer(data=request.data)
        report.is_valid(raise_exception=True)
        status = worker_heartbeat_record(
            credential=self.credential, protocol=self.site_protocol, **report.validated_data
        )
        return Response(
            HeartbeatResultSerializer(
                {
                    "last_seen_at": status.last_seen_at,
                    "online_until": status.last_seen_at + online_window(status.interval_seconds),
                }
            ).data
        )

"""The site API's privacy audit endpoint (under the site API's prefix, ``training.api_urls``):
before a job's approvers decide, a site asks what audit of its own update is asked of it, and
posts its signed report (``training.jobs.privacy_audits``; the report's format is
``training.fl.audit_report``; the intake is ``training.rounds.audit_intake``).

* ``GET  jobs/<job_id>/audit/`` -- ``{"job", "site", "spec_digest", "records", "seed"}`` while
  the job awaits approval and the site's audit of its current spec is asked and not reported;
  409 with a ``code`` when nothing is asked of it now (``not_asked``, ``already_reported``,
  ``not_awaiting_approval``). The spec itself is read from ``jobs/<job_id>/``.
* ``POST jobs/<job_id>/audit/`` -- ``{"report": <canonical text>, "signature": <base64 Ed25519
  over the text's UTF-8 bytes>}``: 201 recorded, 200 the same report was already recorded;
  otherwise ``{"detail", "code"}`` with 400 (``bad_report``, ``bad_signature``,
  ``bad_request``) or 409 (the codes above).

A job the site does not actively take part in is 404, as everywhere in the site API.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from training.rounds.audit_intake import AuditRefused, audit_asked_of, audit_receive
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import bad_request, refusal, site_error

__all__ = ["urlpatterns"]


class AuditAskedSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    site = serializers.SlugField(help_text="This site's slug.")
    spec_digest = serializers.CharField(help_text="The spec digest the audit is asked for.")
    records = serializers.IntegerField(help_text="How many of the site's records to attack.")
    seed = serializers.IntegerField(
        help_text="The seed that fixes the records, the local step, the noise and the attacks."
    )


class AuditReportSerializer(serializers.Serializer):
    report = serializers.CharField(
        trim_whitespace=False,
        max_length=200_000,
        help_text="The report's canonical JSON text (training.fl.audit_report): figures only.",
    )
    signature = serializers.CharField(
        max_length=200, help_text="Base64 Ed25519 signature over the report text's UTF-8 bytes."
    )


class AuditResultSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    site = serializers.SlugField()
    spec_digest = serializers.CharField()
    outcome = serializers.CharField(help_text="measured, or out_of_reach.")
    report_digest = serializers.CharField()
    duplicate = serializers.BooleanField()


class SiteAuditView(SiteAPIView):
    """The privacy audit asked of a site before a job's approval, and its signed report."""

    @extend_schema(
        tags=["site"],
        summary="The privacy audit asked of this site before a job's approval",
        responses={
            200: AuditAskedSerializer,
            401: site_error("No site token, or an invalid or revoked one."),
            404: site_error("No such job for this site."),
            409: site_error(
                "Nothing is asked of this site now (the code says why: not_asked, "
                "already_reported, not_awaiting_approval)."
            ),
        },
    )
    def get(self, request, job_id: int):
        self.require_job(job_id)
        try:
            asked = audit_asked_of(self.credential, job_id)
        except AuditRefused as exc:
            return refusal(exc)
        return Response(AuditAskedSerializer(asked).data)

    @extend_schema(
        tags=["site"],
        summary="Post this site's signed privacy audit report of a proposed job",
        request=AuditReportSerializer,
        responses={
            201: OpenApiResponse(AuditResultSerializer, description="Recorded."),
            200: OpenApiResponse(
                AuditResultSerializer, description="The same report was already recorded."
            ),
            400: site_error(
                "The report is malformed, is another audit's, or does not verify (bad_report, "
                "bad_signature, bad_request)."
            ),
            401: site_error("No site token, or an invalid or revoked one."),
            404: site_error("No such job for this site."),
            409: site_error("Nothing is asked of this site now, or it reported something else."),
        },
    )
    def post(self, request, job_id: int):
        self.require_job(job_id)
        body = AuditReportSerializer(data=request.data)
        if not body.is_valid():
            return bad_request(body.errors)
        try:
            row, duplicate = audit_receive(
                self.credential,
                job_id,
                body.validated_data["report"],
                body.validated_data["signature"],
            )
        except AuditRefused as exc:
            return refusal(exc)
        answer = AuditResultSerializer(
            {
                "job": job_id,
                "site": self.credential.institution.slug,
                "spec_digest": row.spec_digest,
                "outcome": row.outcome,
                "report_digest": row.report_digest,
                "duplicate": duplicate,
            }
        ).data
        return Response(answer, status=status.HTTP_200_OK if duplicate else status.HTTP_201_CREATED)


# Under the site API's prefix (``/api/site/v1/``), which ``training.api_urls`` adds.
urlpatterns = [
    path("jobs/<id:job_id>/audit/", SiteAuditView.as_view(), name="site-audit"),
]

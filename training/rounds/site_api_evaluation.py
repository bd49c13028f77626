"""The site API's evaluation endpoints (under the site API's prefix, ``training.api_urls``):
a site asks which of a round's models to evaluate on its validation share, and posts its
signed report (``training.rounds.site_evaluation``; the report's format is
``training.fl.evaluation_report``).

* ``GET  jobs/<job_id>/rounds/<round_index>/evaluation/`` -- ``{"job", "round",
  "spec_digest", "models": [digest, ...], "deadline", "surrogate"}`` while the site is asked
  to evaluate the round (``surrogate``: null, or what it needs to make contribution estimator
  3's surrogate, which its report then carries); 409 with a ``code`` when nothing is asked of
  it now (``not_asked``, ``already_reported``, ``evaluation_closed``). Each model is then read
  from ``jobs/<job_id>/models/<digest>/``.
* ``POST jobs/<job_id>/rounds/<round_index>/evaluation/`` -- ``{"report": <canonical text>,
  "signature": <base64 Ed25519 over the text's UTF-8 bytes>}``: 201 recorded, 200 the same
  report was already recorded; otherwise ``{"detail", "code"}`` with 400 (``bad_report``,
  ``wrong_models``, ``bad_surrogate``, ``bad_records``, ``bad_signature``) or 409.

A job the site does not actively take part in is 404, as everywhere in the site API.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from training.rounds.evaluation_intake import (
    EvaluationRefused,
    evaluation_asked_of,
    evaluation_receive,
)
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import bad_request, refusal, site_error

__all__ = ["urlpatterns"]


class SurrogateAskedSerializer(serializers.Serializer):
    players = serializers.ListField(
        child=serializers.CharField(), help_text="The round's sites, sorted: bit j is the j-th."
    )
    weights = serializers.ListField(
        child=serializers.FloatField(), help_text="The records each site's update counted for."
    )
    base = serializers.CharField(help_text="The digest of the empty coalition's model.")
    singletons = serializers.DictField(
        child=serializers.CharField(), help_text="Each site's own model's digest, by site."
    )


class EvaluationAskedSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    round = serializers.IntegerField()
    spec_digest = serializers.CharField(help_text="The job's spec digest.")
    models = serializers.ListField(
        child=serializers.CharField(), help_text="The digests of the models to evaluate."
    )
    deadline = serializers.DateTimeField(help_text="When the evaluation closes without it.")
    surrogate = SurrogateAskedSerializer(
        allow_null=True,
        help_text="Asked for contribution estimator 3: the site also reports its surrogate "
        "value of every coalition (training.fl.coalition_surrogate); null when not asked.",
    )


class EvaluationReportSerializer(serializers.Serializer):
    report = serializers.CharField(
        trim_whitespace=False,
        max_length=2_000_000,
        help_text="The report's canonical JSON text (training.fl.evaluation_report).",
    )
    signature = serializers.CharField(
        max_length=200, help_text="Base64 Ed25519 signature over the report text's UTF-8 bytes."
    )


class EvaluationResultSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    round = serializers.IntegerField()
    site = serializers.SlugField()
    records = serializers.IntegerField()
    report_digest = serializers.CharField()
    duplicate = serializers.BooleanField()


class SiteEvaluationView(SiteAPIView):
    """The models a site is asked to evaluate after a round, and its signed report."""

    @extend_schema(
        tags=["site"],
        summary="The models this site is asked to evaluate after a round",
        responses={
            200: EvaluationAskedSerializer,
            401: site_error("No site token, or an invalid or revoked one."),
            404: site_error("No such job for this site."),
            409: site_error("Nothing is asked of this site now (the code says why)."),
        },
    )
    def get(self, request, job_id: int, round_index: int):
        self.require_job(job_id)
        try:
            asked = evaluation_asked_of(self.credential, job_id, round_index)
        except EvaluationRefused as exc:
            return refusal(exc)
        return Response(EvaluationAskedSerializer(asked).data)

    @extend_schema(
        tags=["site"],
        summary="Post this site's signed evaluation report of a round's models",
        request=EvaluationReportSerializer,
        responses={
            201: OpenApiResponse(EvaluationResultSerializer, description="Recorded."),
            200: OpenApiResponse(
                EvaluationResultSerializer, description="The same report was already recorded."
            ),
            400: site_error("The report is malformed, names other models, or does not verify."),
            401: site_error("No site token, or an invalid or revoked one."),
            404: site_error("No such job for this site."),
            409: site_error("Nothing is asked of this site now, or it reported something else."),
        },
    )
    def post(self, request, job_id: int, round_index: int):
        self.require_job(job_id)
        body = EvaluationReportSerializer(data=request.data)
        if not body.is_valid():
            return bad_request(body.errors)
        try:
            row, duplicate = evaluation_receive(
                credential=self.credential,
                job_id=job_id,
                round_index=round_index,
                report=body.validated_data["report"],
                signature=body.validated_data["signature"],
            )
        except EvaluationRefused as exc:
            return refusal(exc)
        answer = EvaluationResultSerializer(
            {
                "job": job_id,
                "round": round_index,
                "site": self.credential.institution.slug,
                "records": row.records,
                "report_digest": row.report_digest,
                "duplicate": duplicate,
            }
        ).data
        return Response(answer, status=status.HTTP_200_OK if duplicate else status.HTTP_201_CREATED)


# Under the site API's prefix (``/api/site/v1/``), which ``training.api_urls`` adds.
urlpatterns = [
    path(
        "jobs/<id:job_id>/rounds/<id:round_index>/evaluation/",
        SiteEvaluationView.as_view(),
        name="site-evaluation",
    ),
]

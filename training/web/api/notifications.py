"""Endpoints for the user's own in-app notifications: list, mark read."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.core.converters import MAX_ID
from consortium.governance.models import Notification
from training.jobs import selectors
from training.jobs.notifications import notification_mark_read
from training.web.api.responses import INVALID


class NotificationSerializer(serializers.ModelSerializer):
    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = Notification
        fields = ["id", "consortium", "message", "url", "created_at", "read_at"]
        read_only_fields = fields


class MarkReadSerializer(serializers.Serializer):
    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        allow_null=True,
        default=None,
        help_text="The notifications to mark read; leave out to mark every one.",
    )


class MarkedSerializer(serializers.Serializer):
    marked = serializers.IntegerField(help_text="How many notifications were unread and now are.")


@extend_schema_view(list=extend_schema(summary="Your notifications, newest first"))
class NotificationViewSet(mixins.ListModelMixin, GovernanceViewSet):
    """Your own in-app notifications."""

    queryset = Notification.objects.all()
    serializer_class = NotificationSerializer
    # Scoped to the user's own notifications.
    permission_map = {"list": VISIBLE, "mark_read": VISIBLE}

    def visible_queryset(self, user):
        return selectors.notifications_of(user)

    @extend_schema(
        summary="Mark your notifications read (the ones named, or all)",
        request=MarkReadSerializer,
        responses={200: MarkedSerializer, 400: INVALID},
    )
    @action(detail=False, methods=["post"], url_path="mark-read")
    def mark_read(self, request):
        data = self.validated_input(MarkReadSerializer)
        marked = notification_mark_read(user=request.user, notification_ids=data["ids"])
        return Response(MarkedSerializer({"marked": marked}).data)

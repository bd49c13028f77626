"""The signed-in user's notifications page."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect
from django.views.generic import TemplateView

from consortium.core.pages import SIGNED_IN, PermissionRequiredMixin
from training.jobs import selectors
from training.jobs.notifications import notification_mark_read

NOTIFICATIONS_PER_PAGE = 50


class NotificationListView(PermissionRequiredMixin, TemplateView):
    """The signed-in user's notifications, newest first; POST marks them all read."""

    permission_required = SIGNED_IN
    template_name = "training/notification_list.html"

    def get_context_data(self, **kwargs):
        notifications = selectors.notifications_of(self.request.user).select_related("consortium")
        page = Paginator(notifications, NOTIFICATIONS_PER_PAGE).get_page(
            self.request.GET.get("page")
        )
        return super().get_context_data(page_obj=page, notifications=page.object_list, **kwargs)

    def post(self, request, *args, **kwargs):
        count = notification_mark_read(user=request.user)
        messages.success(
            request, f"{count} notification{'s' if count != 1 else ''} marked as read."
        )
        return redirect("training:notification-list")

"""Template context for every page: the signed-in user's unread notifications."""

from training.jobs.selectors import unread_notification_count


def notifications(request):
    """``unread_notifications``: one COUNT query, and none for anonymous visitors."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"unread_notifications": 0}
    return {"unread_notifications": unread_notification_count(user)}

"""Queue names, in one place (DESIGN section 6).

The coordinator's tasks run on ``central``; each hospital's site worker consumes
only ``site.<institution slug>``.
"""

CENTRAL_QUEUE = "central"


def site_queue(institution_slug: str) -> str:
    return f"site.{institution_slug}"

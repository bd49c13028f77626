"""Template context shared by every page: the consortia the user belongs to."""

from consortium.governance.selectors import consortia_visible_to


def navigation(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"nav_consortia": []}
    return {"nav_consortia": list(consortia_visible_to(user).only("name", "slug"))}

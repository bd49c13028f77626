"""Pages for site data sets, training jobs and approvals (namespace ``training``)."""

app_name = "training"
urlpatterns: list = []

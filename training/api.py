"""REST API for site data sets, training jobs and approvals."""

"""Training jobs, approvals, rounds and site updates arrive with the jobs issue."""

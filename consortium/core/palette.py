"""The colours of every chart, defined once.

Why: the job page, the dashboard and the PDF reports draw the same things (an institution's
series, a cap, the global model's metric). A hospital drawn blue on one page and orange on the
next, or a cap drawn in a colour the page also uses for data, reads as a different thing. The
pages receive :func:`chart_palette` through ``json_script`` (the browser's scripts never hard-code
a colour); the PDF builders can import the same constants (ReportLab takes these hex strings).

An institution's colour depends only on its primary key, so it is the same on every page, in
every job, whatever the other participants are. The series colours are the Okabe-Ito set, which
stays distinguishable for the common colour-vision deficiencies; black is kept for the global
model's metric and the caps are drawn in the "bad" red of the stylesheet (``static/css/app.css``).
"""

from __future__ import annotations

#: Colours for institutions' series (Okabe-Ito, without black and yellow: too light on white).
SERIES = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermilion
)

#: The global model's validation metric (one series, above the institutions').
GLOBAL_MODEL = "#1d2433"
#: A cap (the privacy budget's limit), drawn as a line: the stylesheet's ``--bad``.
CAP = "#b42318"
#: Privacy spent in the current job, next to the total spent in all jobs.
SPENT_THIS_JOB = "#0b5cad"
#: Privacy spent in all jobs.
SPENT_ALL_JOBS = "#8fb3dc"
#: Axis lines, grid and text (the stylesheet's ``--muted`` and ``--line``).
AXIS = "#5b6475"
GRID = "#dde1e7"


def institution_colour(institution_id: int) -> str:
    """The colour of one institution's series, the same on every page and report."""
    return SERIES[(int(institution_id) - 1) % len(SERIES)]


def chart_palette(institutions=()) -> dict:
    """What a page's chart script needs, JSON-ready: the fixed colours and each given
    institution's colour by its name (the charts' series are named by institution)."""
    return {
        "series": list(SERIES),
        "global_model": GLOBAL_MODEL,
        "cap": CAP,
        "spent_this_job": SPENT_THIS_JOB,
        "spent_all_jobs": SPENT_ALL_JOBS,
        "axis": AXIS,
        "grid": GRID,
        "institutions": {i.name: institution_colour(i.pk) for i in institutions},
    }

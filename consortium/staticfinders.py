"""plotly.js served from the installed ``plotly`` package, as a static file.

The dashboard's charts need plotly.js, and no page may fetch an asset from a CDN. The Python
package we already depend on ships the minified bundle; this finder exposes that one file as
``vendor/plotly.min.js`` (nothing else of the package's data), so ``{% static %}``, WhiteNoise and
``collectstatic`` treat it like our own files and the version always matches the package.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PLOTLY_STATIC_PATH = "vendor/plotly.min.js"
_PREFIX, _NAME = PLOTLY_STATIC_PATH.rsplit("/", 1)


def plotly_bundle() -> Path:
    import plotly  # on use: plotly is a large import and only its bundle's path is needed

    return Path(plotly.__file__).parent / "package_data" / _NAME


class PlotlyFinder(BaseFinder):
    def check(self, **kwargs):
        from django.core.checks import Error  # on use: only the system check needs it

        if not plotly_bundle().is_file():
            return [
                Error(
                    f"plotly.js is missing from the installed plotly package ({plotly_bundle()})",
                    hint="Reinstall the project's dependencies (pip install -e .).",
                    id="consortium.E010",
                )
            ]
        return []

    def find(self, path, find_all=False, **kwargs):
        find_all = find_all or kwargs.get("all", False)
        if path != PLOTLY_STATIC_PATH:
            return []
        found = str(plotly_bundle())
        return [found] if find_all else found

    def list(self, ignore_patterns):
        storage = FileSystemStorage(location=str(plotly_bundle().parent))
        storage.prefix = _PREFIX
        yield _NAME, storage

"""WSGI entry point (pages and API; websockets need the ASGI one)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
application = get_wsgi_application()

"""WSGI entry point: ``gunicorn --threads 32 llmsite.wsgi`` (run from examples/django_app)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
application = get_wsgi_application()

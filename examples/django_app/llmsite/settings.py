"""Settings of the example project, from environment variables with development defaults.

``DJANGO_SECRET_KEY`` (required when ``DJANGO_DEBUG`` is off in a real deployment),
``DJANGO_DEBUG`` (``1`` to enable), ``DJANGO_ALLOWED_HOSTS`` (comma-separated),
``LLM_TOTAL_TIMEOUT`` (seconds for one model call, retries included; default 20) and
``LLM_ALLOWED_MODELS`` (comma-separated names a request may pick). The model client itself is
configured the llmutils way (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``LLMUTILS_*``, config.ini).
"""

import os

DEBUG = os.environ.get("DJANGO_DEBUG", "0").lower() in ("1", "true", "yes", "on")
# The fallback key is for local runs only; set DJANGO_SECRET_KEY anywhere else.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "django-insecure-llmutils-example-only"
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h.strip()]

INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "llmsite.urls"
WSGI_APPLICATION = "llmsite.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

LLM_TOTAL_TIMEOUT = float(os.environ.get("LLM_TOTAL_TIMEOUT", "20"))
LLM_ALLOWED_MODELS = [
    m.strip() for m in os.environ.get("LLM_ALLOWED_MODELS", "gpt-4.1-mini,gpt-4.1-nano,gpt-4o-mini").split(",") if m.strip()
]
LLM_MAX_PROMPT_CHARS = 8000

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"llmsite": {"handlers": ["console"], "level": "INFO"}},
}

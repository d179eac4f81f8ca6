"""A minimal Django project whose view asks a model through llmutils (see ``views.py``).

Run it (works offline: without ``OPENAI_API_KEY`` or a base URL it answers with llmutils' mock
client, ``"echo: <prompt>"``)::

    pip install django
    cd examples/django_app
    python manage.py runserver
    curl -s localhost:8000/ask -H 'Content-Type: application/json' -d '{"prompt": "Hello"}'
    # {"answer": "echo: Hello", "cached": false, "model": "gpt-4.1-mini"}

No database, no apps: one JSON view, settings from environment variables (``settings.py``),
the shared client in ``llm.py``.
"""

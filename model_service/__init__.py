"""One model behind an OpenAI-compatible HTTP API, run by gunicorn as a supervisord program."""

"""``llava-edge serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); nothing here is imported by ``run``.
"""

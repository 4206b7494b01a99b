"""Rewards as a service: a reward server (``dancecore serve-reward``), the ``remote`` reward that
calls it, and the ``vlm-judge`` reward that asks an OpenAI-compatible vision-language model.

- :mod:`~dancecore.serving.protocol`: the wire format (versioned JSON and safetensors or PNG/WebP
  bytes; never pickle), shared by the server and the client;
- :mod:`~dancecore.serving.server`: the ASGI application (Starlette), batching, auth and limits;
- :mod:`~dancecore.serving.serve`: what ``dancecore serve-reward`` runs (uvicorn, SIGTERM);
- :mod:`~dancecore.serving.client`: the ``remote`` reward;
- :mod:`~dancecore.serving.judge`: the ``vlm-judge`` reward.

See docs/serving.md.
"""

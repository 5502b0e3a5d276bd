"""The router: one OpenAI endpoint in front of prefill and decode pools. Imports no torch.

    cli.py        `pdserve router` flags (also `python -m pdserve.router.cli`, which loads nothing else)
    app.py        aiohttp routes: /v1/*, /health, /metrics, /status, /instances; API key check
    proxy.py      the P->D flow: decode pick, conditional disaggregation, retries, first token early
    upstream.py   one call to one worker (JSON or SSE), failures sorted into retry / hand to client
    openai_io.py  wire format: prefill body, first-token chunk, skipping the repeated first token
    instances.py  pools, health checks, in-flight counts, last errors
    metrics.py    Prometheus metrics under `pdserve:`
    policies.py   round_robin, least_loaded, prefix_aware (shared with the simulator)
    placement.py  local or remote prefill, and the cached prefix it counts (shared with the simulator)
"""

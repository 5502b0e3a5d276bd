"""One worker's HTTP API: OpenAI-compatible endpoints around one engine, plus the KV hand-off."""

"""The OpenAI-compatible HTTP server (`sugam serve`)."""

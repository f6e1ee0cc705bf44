"""The OpenAI-compatible server: request checking (requests), output pipeline (output), generation
runs over the batching engine (service), HTTP (app), counters (metrics). Entry point: kimi_jax.serve."""

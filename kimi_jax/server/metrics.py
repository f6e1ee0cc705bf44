"""Server counters and the Prometheus text form of /metrics (JSON with ?format=json)."""

from __future__ import annotations

import dataclasses
import time

# name -> (Prometheus type, help). Engine values come from BatchEngine.metrics(); the rest from Counters.
_HELP = {
    "slots_busy": ("gauge", "decode slots running a request"),
    "slots_total": ("gauge", "decode slots"),
    "queue_len": ("gauge", "requests waiting for a slot"),
    "pages_used": ("gauge", "latent-cache pages in use"),
    "pages_cached": ("gauge", "free latent-cache pages still holding a reusable prefix"),
    "pages_total": ("gauge", "latent-cache pages"),
    "page_size": ("gauge", "tokens per latent-cache page"),
    "prefix_cache_hit_rate": ("gauge", "fraction of prompt tokens served from the prefix cache"),
    "prompt_tokens": ("counter", "prompt tokens submitted"),
    "cached_tokens": ("counter", "prompt tokens served from the prefix cache"),
    "generated_tokens": ("counter", "tokens generated"),
    "requests_finished": ("counter", "requests the engine finished, whatever the reason"),
    "tokens_per_second": ("gauge", "generated tokens per second, recent"),
    "draft_tokens": ("counter", "draft tokens proposed to verify steps (speculative decoding)"),
    "draft_tokens_accepted": ("counter", "draft tokens the model agreed with"),
    "verify_steps": ("counter", "verify steps dispatched instead of decode steps"),
    "tokens_per_verify_row": ("gauge", "tokens a verify step made per request, on average"),
    "streams_active": ("gauge", "streaming responses in progress"),
    "requests_cancelled": ("counter", "requests whose client left before the end"),
    "requests_rejected_busy": ("counter", "requests refused with 429"),
    "requests_failed": ("counter", "requests answered with another 4xx or 5xx"),
}
PREFIX = "kimi_jax_"


@dataclasses.dataclass
class Counters:
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))
    streams_active: int = 0
    requests_cancelled: int = 0
    requests_rejected_busy: int = 0
    requests_failed: int = 0

    def count_error(self, status: int) -> None:
        if status == 429:
            self.requests_rejected_busy += 1
        else:
            self.requests_failed += 1

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "started"}


def prometheus_text(values: dict) -> str:
    lines = []
    for name, value in values.items():
        # A value missing from _HELP is 'untyped', never guessed: a counter typed as a gauge misleads
        # rate() and alerts (tests/test_server.py checks that every value is listed).
        kind, text = _HELP.get(name, ("untyped", name.replace("_", " ")))
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {float(value):g}"]
    return "\n".join(lines) + "\n"

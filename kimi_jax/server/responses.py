"""The shapes of OpenAI responses built from parser events: stream deltas, messages, SSE frames."""

from __future__ import annotations

import json

from kimi_jax.chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallStart


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chat_deltas(events) -> list[dict]:
    """OpenAI `delta` objects for parser events (warnings and call ends have none)."""
    deltas = []
    for e in events:
        if isinstance(e, ReasoningDelta):
            deltas.append({"reasoning_content": e.text})
        elif isinstance(e, ContentDelta):
            deltas.append({"content": e.text})
        elif isinstance(e, ToolCallStart):
            deltas.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                           "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, ToolCallArgumentsDelta):
            deltas.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return deltas


def chat_message(parsed) -> dict:
    """The assistant message of a non-streamed response."""
    message = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else ""),
               "reasoning_content": parsed.reasoning_content}
    if parsed.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.tool_calls]
    return message

"""Chat layer: tokenizer, chat template, output parser. Pure Python: importing it never loads JAX."""

from kimi_jax.chat.parser import (
    ContentDelta,
    ParsedMessage,
    ParseWarning,
    ReasoningDelta,
    StreamParser,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    format_output,
    parse_output,
)
from kimi_jax.chat.template import ChatTemplate, render_chat
from kimi_jax.chat.tokenizer import StreamDecoder, Tokenizer, byte_level_ranks, write_tokenizer_files
from kimi_jax.chat.tool_calls import ToolCallResolver, normalize_history

__all__ = [
    "ChatTemplate",
    "ContentDelta",
    "ParseWarning",
    "ParsedMessage",
    "ReasoningDelta",
    "StreamDecoder",
    "StreamParser",
    "Tokenizer",
    "ToolCall",
    "ToolCallArgumentsDelta",
    "ToolCallEnd",
    "ToolCallResolver",
    "ToolCallStart",
    "byte_level_ranks",
    "format_output",
    "normalize_history",
    "parse_output",
    "render_chat",
    "write_tokenizer_files",
]

"""Tools the model may call: the registry (`registry`) and the safe builtin demo tools (`builtin`)."""

from kimi_jax.tools.builtin import (
           TABLES,
           KVStore,
           builtin_tools,
           convert,
           evaluate,
           lookup_row,
           unit_spellings,
)
from kimi_jax.tools.registry import ToolError, ToolRegistry, ToolResult

__all__ = ["TABLES", "KVStore", "ToolError", "ToolRegistry", "ToolResult", "builtin_tools", "convert", "evaluate",
           "lookup_row", "unit_spellings"]

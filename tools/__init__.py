"""moe2 tools."""

"""Built-in tool-call parsers (hermes, mistral, llama3_json, pythonic, qwen) and their shared streaming engine."""

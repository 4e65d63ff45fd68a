"""HTTP API over one engine: qwen-edge's own endpoints, OpenAI- and Ollama-compatible ones, health."""
from edge.api.app import create_app
from edge.api.serving import ServingState

__all__ = ["create_app", "ServingState"]

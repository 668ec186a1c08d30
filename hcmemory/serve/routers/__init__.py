"""The server's routers: OpenAI's endpoints, the memory endpoints, health."""

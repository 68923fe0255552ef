"""What every layer shares: the request context, OpenAI errors, ASGI helpers, the admin rule,
the layer protocols and the server secret. Imports only ``fortress.config``."""

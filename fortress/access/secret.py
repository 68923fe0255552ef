"""The server secret, shared with the audit chain; see ``fortress.secret``."""

from fortress.secret import SecretMissing, load_secret, secret_path

__all__ = ["SecretMissing", "load_secret", "secret_path"]

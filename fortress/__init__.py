"""Fortress: an always-on, OpenAI-compatible front door for self-hosted LLMs."""

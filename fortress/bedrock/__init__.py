"""An OpenAI-compatible adapter in front of one Amazon Bedrock model (the Converse API).

``python -m fortress.bedrock --port 9001 --model-id anthropic.claude-3-haiku-20240307-v1:0``
serves ``/v1/chat/completions`` (plain and streamed), ``/v1/models``, ``/health`` and
``/metrics``. Fortress starts it as the local engine ``bedrock`` (``fortress.engines.bedrock``)
so a Bedrock model is a pool like any other. It imports nothing else of Fortress: like the
simulator it is a server of its own, reached over HTTP.
"""

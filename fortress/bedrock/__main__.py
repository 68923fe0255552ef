"""``python -m fortress.bedrock --port N --model-id ID``: run the Bedrock adapter."""

from fortress.bedrock.command import main

main()

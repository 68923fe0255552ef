"""The config's AWS deployment as a CDK (Python) app: ``fortress deploy aws synth``.

``aws_cdk`` is an optional dependency (``pip install 'fortress[deploy]'``): this package imports
it only inside :func:`build_app` and :func:`synth`, and nothing outside the ``fortress deploy``
command imports this package, so the gateway never needs it.
"""

from __future__ import annotations

from fortress.deploy.aws.errors import CdkMissing, DeployError
from fortress.deploy.aws.runner import (
    CDK_PACKAGE,
    SynthResult,
    cdk_command,
    require_cdk,
    synth,
    write_cdk_app,
)

__all__ = [
    "CDK_PACKAGE",
    "CdkMissing",
    "DeployError",
    "SynthResult",
    "cdk_command",
    "require_cdk",
    "synth",
    "write_cdk_app",
]

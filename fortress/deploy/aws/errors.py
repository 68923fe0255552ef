"""What makes a config undeployable, as exceptions the CLI turns into exit 2."""

from __future__ import annotations


class DeployError(Exception):
    """The config cannot be deployed as it is (no ``deploy.aws``, no gateway image...)."""


class CdkMissing(DeployError):
    """aws-cdk-lib (an optional dependency) is not installed."""

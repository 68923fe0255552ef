"""From ``fortress.yaml`` to AWS: the CDK app that deploys the config, and what it costs.

``pricing`` (a bundled price table that names its region, date and source) and ``cost`` (the
monthly cost of the config, line by line) price the deployment; ``aws`` builds the CDK app.
Nothing here runs on the request path: the ``fortress cost`` and ``fortress deploy`` commands
use it.
"""

"""Observability: metrics, alarms, the live dashboard and the access log.

``fortress.observe.observability.Observability`` builds them from the config; the runtime hands
its observers and routes to the gateway and starts and stops it. Nothing here is on the request
path beyond an observer call per finished request.
"""

"""The fleet: which replicas should exist, and keeping them running.

Today: the supervisor of local replica processes (``supervisor``). The autoscaler, schedules,
scale to zero and the providers (local processes, AWS Auto Scaling groups) come here too: the
fleet decides, platforms provision, and the gateway only sees the router change.
"""

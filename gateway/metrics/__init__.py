"""Prometheus metrics: workers tally what they serve, the launcher serves ``/metrics``."""

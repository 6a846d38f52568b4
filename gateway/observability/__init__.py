"""Metrics, logs and the audit chain."""

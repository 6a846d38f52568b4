"""Shared fixtures for all three depths of tests."""

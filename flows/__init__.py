"""Prefect flows that compose dedt's stage tasks, and the ``dedt`` command line."""

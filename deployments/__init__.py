"""Prefect deployments of the retraining flows (pools, schedules, concurrency)."""

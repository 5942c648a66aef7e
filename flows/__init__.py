"""Prefect flows: thin orchestration over the DVC stages in components/."""

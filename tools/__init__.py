"""Maintenance scripts for the repository (not installed)."""

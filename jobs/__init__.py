"""Drivers and entry points that ``ray job submit`` runs."""

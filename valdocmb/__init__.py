"""Cerebral microbleed detection for the MICCAI "Where is VALDO?" Task 2."""

__version__ = "0.1.0"

"""Configurations of the language example."""

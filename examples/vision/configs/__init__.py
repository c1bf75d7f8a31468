"""Configurations of the vision example."""

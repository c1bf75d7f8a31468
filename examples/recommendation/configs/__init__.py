"""Configurations of the recommendation example."""

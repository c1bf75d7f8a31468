"""Test set-up of the examples: 8 simulated CPU devices."""

from examples import common

# Must run before any backend starts (a larger request, e.g. by
# tests/conftest.py, is kept).
common.request_cpu_devices(8)

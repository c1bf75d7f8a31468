"""The baselines Global-QSGD is compared with, one module per method."""

"""Helper scripts run as ``python -m lcnn.tools.<name>`` (benchmarks and maintenance, not workflow stages)."""

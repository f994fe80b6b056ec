"""The ``latentlink`` command: one entry point that dispatches to the edge, host and export tools."""

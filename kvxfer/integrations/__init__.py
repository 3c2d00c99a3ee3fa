"""Adapters that run kvxfer's parts inside other serving engines (each in its own subpackage,
the only place that imports that engine)."""

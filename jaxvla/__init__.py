"""jaxvla: models, episode schema, export format and the numpy-only robot client (`jaxvla.actor`)."""

__version__ = "0.1.0"

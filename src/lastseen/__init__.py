"""lastseen: a durable callback service that keeps the online objects and when they were seen."""

__version__ = "0.1.0"

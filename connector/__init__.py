"""Tandem: a consistent, continuously updated backup of Kafka topics."""

__version__ = "0.1.0"

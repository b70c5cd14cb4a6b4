"""Tradeoff Lab's measuring engine: config -> worker process -> result -> store."""
from .config import BenchConfig, ConfigError

__all__ = ["BenchConfig", "ConfigError"]

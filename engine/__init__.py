"""Tradeoff Lab's measuring engine: config -> worker process -> result -> store."""
from .config import BenchConfig, ConfigError, check_runnable
from .results import Result

__all__ = ["BenchConfig", "ConfigError", "Result", "check_runnable"]

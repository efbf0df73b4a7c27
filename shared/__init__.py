"""Wire protocol, typed topics, configuration and MQTT helpers shared by agent and coordinator.

This package imports neither ``moe2.agent`` nor ``moe2.coordinator``.
"""

__version__ = "0.1.0"

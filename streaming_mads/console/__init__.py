"""The console in the main process: probe, measure influence, update memories and θ, publish.

``config`` holds the settings, ``console`` the loop, ``rewards`` the update rule of the paper,
``bandit`` the ODM-style EXP3 baseline run by the same loop, ``reference`` the reference set,
``metrics`` logger-safe metric names and ``history`` the printed lines and the weight-history file.
See docs/architecture.md.
"""

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.console import Console

__all__ = ['Console', 'ConsoleConfig']

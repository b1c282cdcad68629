"""The console in the main process: probe, measure influence, update memories and θ, publish.

``console`` holds the update loop, ``rewards`` the update rule of the paper, ``bandit`` the
ODM-style EXP3 baseline run by the same loop. See docs/architecture.md.
"""

from streaming_mads.console.console import Console, ConsoleConfig

__all__ = [Console, ConsoleConfig]

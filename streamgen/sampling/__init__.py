"""Flow-matching schedules, samplers and the streaming chunk loop.

- ``schedules``: shift, Self-Forcing's warped few-step list, UniPC/Euler grids (``FlowSchedule``).
- ``samplers``: Euler / UniPC steppers with CFG for non-distilled checkpoints.
- ``stream``: ``SessionState`` (one session's GPU state: caches, noise, prompt switches, image start).
- ``full``: bidirectional whole-clip sampling (non-distilled checkpoints, `generate` only).

Import the submodules directly; this package imports nothing heavy.
"""

"""Flow-matching schedules, samplers and the streaming chunk loop.

- ``schedules``: shift, Self-Forcing's warped few-step list, UniPC/Euler grids (``FlowSchedule``).
- ``samplers``: Euler / UniPC steppers with CFG for non-distilled checkpoints.
- ``stream``: ``SessionState`` (one stream: caches, noise, prompt switches, image start).
- ``generate``: the ``streamgen generate`` command (heavy imports inside ``run``).

Import the submodules directly; this package imports nothing heavy.
"""

"""Host-side storage that takes its contents from a sandbox: the copy-out paths that must stay confined.

Everything a sandbox says (names, types, modes, sizes, how many entries) is hostile input here: its
root can impersonate the agent. ``confined.ConfinedWriter`` is the one way such data reaches the host
filesystem (``shoal cp`` out of a sandbox today; snapshot and template tooling later).
"""

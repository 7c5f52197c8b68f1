"""Checkpointability: the support table (what crelf can save and restore, and why
not), user policies, crcheck, and the crrun monitor that flags state as it is created."""

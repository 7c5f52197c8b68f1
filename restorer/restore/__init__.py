"""The restore of each kind of resource, one module per kind, named as its dump in
statefile/dump/ (statefile/dump/pipes.py is restored by restorer/restore/pipes.py)."""

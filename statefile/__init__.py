"""crelf statefile: the format (ELF core + CRELF notes) and the checkpoint side."""

__version__ = "0.1.0"
FORMAT_VERSION = 1

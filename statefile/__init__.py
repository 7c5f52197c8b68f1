"""crelf statefile: the format (ELF core + CRELF notes) and the checkpoint side."""

__version__ = "0.1.0"
# CR_HEADER "format": 2 adds one CRC-32 per 1 MiB chunk of every segment
# (docs/FORMAT.md); format 1 statefiles are still read (restarted eagerly).
FORMAT_VERSION = 2

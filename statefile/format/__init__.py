"""The statefile format: ELF core structures, the notes and records crelf writes,
the streaming writer, the reader that loads and verifies a statefile, and checksums."""

"""What makes a restart all or nothing: the release freezer, the release gate (no
freezer) and the guard that undoes a restart whose crrestart died."""

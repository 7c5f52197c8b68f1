"""Taking hold of a running tree: freezing it (ptrace), running syscalls inside its
threads, copy-on-write snapshots, the way back if crcheckpoint dies, and /proc readers."""

"""crelf's restart side: rebuild a process from its statefile (``crrestart``).

The restorer forks the task with its original pid (clone3 set_tid), lets it
restore what a process can set from inside (files, cwd, limits, session), parks
it, then replaces its address space, threads and registers by ptrace syscall
injection (see NOTES.md "Restore by ptrace syscall injection").
"""

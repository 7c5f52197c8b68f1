"""The checkpoint of each kind of resource: one module per kind (files, pipes, unix
sockets, ttys, memory, IPC...), restored by the module of the same name in
restorer/restore/."""

"""crinspect: read a crelf statefile without gdb.

This package lives in ``inspect/crinspect`` and is imported as ``crinspect``.
The folder ``inspect/`` itself must never become a package (no __init__.py):
a folder named ``inspect`` on sys.path would shadow the standard library's
inspect module, which click imports.
"""

"""crrestart: restart a process from its statefile.

Exit codes: the restored process's own exit status in the foreground (128+N
when it was killed by signal N); with --detach 0 once it runs again; 2 for a
usage error; 3 when the restore was refused or failed (one line on stderr
naming the step).
"""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import RestoreError

EXIT_FAILED = 3


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("statefile", required=False, type=click.Path(dir_okay=False))
@click.option("--detach", "-d", is_flag=True,
              help="Return as soon as the process runs again (default: wait for it and "
                   "exit with its status).")
@click.option("--pidns", is_flag=True,
              help="Restore into a new pid namespace (a child of crrestart is its init and "
                   "reaps): use when "
                   "the original pid is taken.  A tree that had a pid namespace of its own "
                   "always gets a new one, its root as pid 1 (root only).")
@click.option("--force-files", is_flag=True,
              help="Restore even if open files changed since the checkpoint.")
@click.option("--lazy/--eager", default=None,
              help="Lazy: memory arrives on first touch (userfaultfd, root only) and is "
                   "served by crrestart (a small daemon with --detach) until all is in; "
                   "eager: copied in before the process runs.  Default: lazy when root and "
                   "the image holds 256 MiB or more of anonymous memory, else eager.")
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as JSON "
              "(stderr).")
@click.option("--verbose", "-v", is_flag=True, help="Print timings.")
@click.option("--register", is_flag=True, help="Install the binfmt_misc rule so ./app.cr "
              "restarts (root).")
@click.option("--unregister", is_flag=True, help="Remove the binfmt_misc rule (root).")
@click.option("--status", "show_status", is_flag=True,
              help="Say whether the binfmt_misc rule is installed.")
def main(statefile, detach, pidns, force_files, lazy, as_json, verbose, register, unregister,
         show_status):
    """Restart the process saved in STATEFILE where it was checkpointed."""
    if register or unregister or show_status:
        from . import binfmt
        try:
            if register:
                click.echo(binfmt.register())
            elif unregister:
                click.echo(binfmt.unregister())
            else:
                ok, text = binfmt.status()
                click.echo(text)
                sys.exit(0 if ok else 1)
        except RestoreError as e:
            click.echo(f"crrestart: {e}", err=True)
            sys.exit(EXIT_FAILED)
        return
    if not statefile:
        raise click.UsageError("missing STATEFILE")
    from .restore import Options, restore, wait_root
    opts = Options(detach=detach, pidns=pidns, force_files=force_files, lazy=lazy,
                   verbose=verbose)
    try:
        res = restore(statefile, opts)
    except RestoreError as e:
        click.echo(f"crrestart: failed at {e}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        click.echo("crrestart: interrupted; nothing was left running", err=True)
        sys.exit(130)
    for w in res.warnings:
        click.echo(f"crrestart: warning: {w}", err=True)
    _restart_hook(statefile)
    if verbose or as_json:
        info = {"pid": res.vpid, "tracer_pid": res.pid, "init_pid": res.init_pid,
                "tasks": {str(k): v for k, v in res.pids.items()},
                "seconds": round(res.restore_seconds, 6), "bytes_copied": res.bytes_copied,
                "injections": res.injections, "mode": "lazy" if res.lazy else "eager",
                "timings": {k: round(v, 6) for k, v in res.timings.items()}}
        click.echo(json.dumps(info) if as_json else
                   f"crrestart: pid {res.vpid}"
                   + (f" and {len(res.pids) - 1} descendant(s)" if len(res.pids) > 1 else "")
                   + f" restored in {res.restore_seconds * 1000:.1f} ms "
                   f"({res.bytes_copied / 2**20:.1f} MiB copied, {res.injections} injected "
                   f"syscalls)", err=True)
    if res.lazy_server is not None and detach:
        res.lazy_server.daemonize_wait()
    if detach:
        sys.exit(0)
    code = wait_root(res)
    if res.lazy_server is not None:
        res.lazy_server.stop()
    sys.exit(code)


def _restart_hook(statefile: str) -> None:
    """Tell a restored application that opted in to hooks that it was restarted."""
    from statefile import hooks
    from statefile.reader import load
    for task in load(statefile).tasks:
        try:
            reply = hooks.notify(task["pid"], "restart")
        except (hooks.HookError, OSError) as e:
            click.echo(f"crrestart: warning: restart hook of pid {task['pid']}: {e}", err=True)
            continue
        if reply is not None and reply != "ok":
            click.echo(f"crrestart: warning: restart hook of pid {task['pid']}: {reply}",
                       err=True)


if __name__ == "__main__":
    main()


__all__ = ["main", "os"]

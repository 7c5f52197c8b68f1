"""crrestart: restart a process from its statefile.

Exit codes: the restored process's own exit status in the foreground (128+N
when it was killed by signal N); with --detach 0 once it runs again; 2 for a
usage error (one line; --register, --unregister and --status take nothing
else); 3 when the restore was refused or failed, or when the lazy page server
failed and killed the process (one line on stderr naming the step).
"""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import RestoreError

EXIT_FAILED = 3


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("statefile", required=False)
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
def command(statefile, detach, pidns, force_files, lazy, as_json, verbose, register, unregister,
            show_status):
    """Restart the process saved in STATEFILE where it was checkpointed."""
    admin = [n for n, on in (("--register", register), ("--unregister", unregister),
                             ("--status", show_status)) if on]
    if len(admin) > 1:
        raise click.UsageError(f"{' and '.join(admin)} exclude each other")
    if admin:
        others = [n for n, on in (("--detach", detach), ("--pidns", pidns),
                                  ("--force-files", force_files),
                                  ("--lazy/--eager", lazy is not None), ("--json", as_json),
                                  ("--verbose", verbose)) if on]
        if statefile:
            raise click.UsageError(f"{admin[0]} takes no STATEFILE (got {statefile!r})")
        if others:
            raise click.UsageError(f"{admin[0]} takes no other option (got {others[0]})")
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
    from restorer.restart import Options, restore, wait_root
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
    except Exception as e:  # noqa: BLE001  a bug: still one line (the tree was killed)
        if verbose:
            import traceback
            traceback.print_exc()
        click.echo(f"crrestart: failed at restore: internal error ({type(e).__name__}: {e}); "
                   "nothing was left running", err=True)
        sys.exit(EXIT_FAILED)
    from statefile.ledger import note
    note("R", statefile)
    for w in res.warnings:
        click.echo(f"crrestart: warning: {w}", err=True)
    _restart_hook(res.saved_pids)
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
    server = res.lazy_server
    if server is not None and detach:
        server.daemonize_wait()     # a failure from now on: the daemon reports it
    if detach:
        if server is not None and server.error is not None:
            click.echo(server.error_line(), err=True)
            sys.exit(EXIT_FAILED)
        if server is not None:
            # the daemon shares our file table: exit without Python closing
            # any fd on the way out (an open file object would close it for
            # the daemon too)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        sys.exit(0)
    code = wait_root(res)
    if server is not None:
        server.wind_down()
        if server.error is not None:    # the server killed the process: say why
            click.echo(server.error_line(), err=True)
            sys.exit(EXIT_FAILED)
    sys.exit(code)


def main() -> None:
    """Entry point: a usage error is one line too (exit 2)."""
    try:
        rc = command.main(prog_name="crrestart", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"crrestart: usage error: {e.format_message()} (crrestart --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"crrestart: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("crrestart: interrupted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


def _restart_hook(saved_pids: list[int]) -> None:
    """Tell a restored application that opted in to hooks that it was restarted
    (the statefile is not read again: it may be gone or changed by now)."""
    from statefile import hooks
    for pid in saved_pids:
        try:
            reply = hooks.notify(pid, "restart")
        except (hooks.HookError, OSError) as e:
            click.echo(f"crrestart: warning: restart hook of pid {pid}: {e}", err=True)
            continue
        if reply is not None and reply != "ok":
            click.echo(f"crrestart: warning: restart hook of pid {pid}: {reply}", err=True)


if __name__ == "__main__":
    main()


__all__ = ["main", "command", "os"]

"""crcheckpoint: freeze a process tree and write its statefile."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from . import __version__
from .errors import CrelfError


PROGRESS_AFTER = 1.0  # seconds: shorter dumps show no progress bar


class _Progress:
    """click's progress bar on stderr, only on a terminal and only for dumps
    over `after` seconds (PROGRESS_AFTER; only run() in-process changes it).
    The writer tells the total (expect) and each chunk written (call)."""

    def __init__(self, after: float = PROGRESS_AFTER):
        self.start = time.monotonic()
        self.after = after
        self.total = 0
        self.done = 0
        self.bar = None
        self.enabled = sys.stderr.isatty()

    def expect(self, total: int) -> None:
        self.total = total

    def _item(self, _) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-6) / 2**20
        return f"{self.done / 2**20:.0f} MiB written, {rate:.0f} MiB/s"

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is None:
            if time.monotonic() - self.start <= self.after:
                return
            self.bar = click.progressbar(length=max(self.total, self.done, 1),
                                         label="crcheckpoint", file=sys.stderr, width=30,
                                         item_show_func=self._item,
                                         update_min_steps=max(self.total // 100, 1))
            self.bar.__enter__()
            n = self.done
        self.bar.update(n, self.done)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def run_cli(fn, *, json_errors: bool = False, prog: str):
    """Run fn; turn CrelfError and OS errors into one line and an exit code."""
    try:
        return fn()
    except CrelfError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        click.echo(f"{prog}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
                   err=True)
        sys.exit(1)
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("CRELF_DEBUG"):
            raise
        click.echo(f"{prog}: internal error: {type(e).__name__}: {e} "
                   "(set CRELF_DEBUG=1 for a traceback)", err=True)
        sys.exit(70)


def _policy_options(fn):
    from statefile.check.support import POLICY_CLASSES
    fn = click.option("--dump-tmpfs", is_flag=True,
                      help="Keep the content of open files on tmpfs (/dev/shm, /tmp on tmpfs).")(fn)
    fn = click.option("--skip", multiple=True, metavar="CLASS",
                      help=f"Leave out a resource class: {', '.join(POLICY_CLASSES)}.")(fn)
    fn = click.option("--policy", "policy_file", type=click.Path(dir_okay=False),
                      help="TOML policy file (skip, dump_tmpfs, on_unsupported).")(fn)
    fn = click.option("--ext-unix-sk", is_flag=True, expose_value=False,
                      callback=lambda ctx, _p, v: ctx.meta.__setitem__("ext_unix_sk", v),
                      help="Same as --skip external-unix (CRIU's name): a unix datagram "
                           "socket connected to a named socket outside the tree is "
                           "connected to that name again at restart; any other unix "
                           "connection outside comes back as closed by its peer.")(fn)
    return fn


def _skips(skip: tuple[str, ...]) -> tuple[str, ...]:
    """--skip classes, with the one --ext-unix-sk stands for."""
    ext = click.get_current_context().meta.get("ext_unix_sk")
    return tuple(skip) + (("external-unix",) if ext else ())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Statefile to write (created atomically, mode 0600).")
@click.option("--kill", is_flag=True, help="Terminate the whole tree after a successful write.")
@click.option("--fsync", is_flag=True, help="Flush the statefile to disk before renaming it.")
@click.option("--no-cow", is_flag=True,
              help="Keep the tree frozen while its memory is written, instead of releasing "
                   "it once copy-on-write snapshots are taken.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--hook-timeout", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for applications' checkpoint hooks (hooks/crelf_hooks.*).")
@_policy_options
@click.option("--snapshot", is_flag=True,
              help="Write a debug-only statefile (marked not restartable) instead of "
                   "refusing when something cannot be restored.")
@click.version_option(__version__, prog_name="crcheckpoint")
@click.pass_context
def main(ctx: click.Context, pid: int, output: str, kill: bool, fsync: bool, no_cow: bool,
         as_json: bool, hook_timeout: float, policy_file, skip, dump_tmpfs, snapshot) -> None:
    """Checkpoint process PID and all its descendants into one ELF statefile.

    The tree is frozen while its state is written, then runs on unharmed
    (or is killed with --kill).  Resources crelf cannot restore make it
    refuse, listing each one, unless a policy skips them (--skip CLASS,
    --policy FILE) or --snapshot is given.  Exit codes: 0 success, 2 bad
    policy, 3 target cannot be checkpointed, 4 statefile cannot be written,
    6 not checkpointable (reasons listed), 1 other errors.
    """
    from statefile.check import policy as pol
    from .checkpoint import checkpoint

    progress = _Progress(**(ctx.obj or {}).get("progress", {}))
    try:
        summary = run_cli(lambda: checkpoint(
            pid, output, kill=kill, fsync=fsync, progress=progress, cow=not no_cow,
            hook_timeout=hook_timeout,
            policy=pol.build(policy_file, _skips(skip), dump_tmpfs, snapshot, pid=pid)),
            prog="crcheckpoint")
    finally:
        progress.finish()      # (ends the bar's line before an error's)
    if summary["restartable"]:
        from .ledger import note
        note("W", summary["statefile"])
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"crcheckpoint: pid {pid}: {len(summary['pids'])} task(s), "
                   f"{summary['threads']} thread(s), {summary['bytes_stored'] / 2**20:.1f} MiB "
                   f"stored in {summary['statefile']} "
                   f"(frozen {summary['frozen_seconds'] * 1000:.0f} ms)"
                   + ("; tree killed" if kill else ""))
        for s in summary["skipped"]:
            click.echo(f"crcheckpoint: skipped by policy '{s['why']}': {s['where']}: {s['what']}")
        if not summary["restartable"]:
            click.echo("crcheckpoint: snapshot only, NOT restartable:", err=True)
            for line in summary["not_restartable"]:
                click.echo(f"  CR: {line}", err=True)


def run(argv: list[str], *, progress_after: float = PROGRESS_AFTER) -> None:
    """crcheckpoint ARGV in this process (exits like the command does).

    Internal, for the tests: `progress_after` replaces the one-second rule so
    a test can see the progress bar whatever the machine's write speed.  It
    is deliberately not a command-line option or an environment variable.
    """
    main.main(args=[str(a) for a in argv], prog_name="crcheckpoint",
              obj={"progress": {"after": progress_after}})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pid", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.option("-v", "--verbose", is_flag=True, help="List supported resources too.")
@_policy_options
@click.version_option(__version__, prog_name="crcheck")
def crcheck_main(pid: int, as_json: bool, verbose: bool, policy_file, skip, dump_tmpfs) -> None:
    """Tell whether the tree rooted at PID can be checkpointed and restarted.

    Every resource gets a verdict: supported, skippable by policy, or
    unsupported with the reason and where (task, fd, mapping).  The tree is
    not stopped.  Exit 0 only when a checkpoint would succeed, 6 when it
    would be refused, 2 bad policy, 3 bad pid.
    """
    from statefile.check import policy as pol
    from statefile.check.crcheck import check

    skip = _skips(skip)
    report = run_cli(lambda: check(pid, pol.build(policy_file, skip, dump_tmpfs, pid=pid)),
                     prog="crcheck")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for t in report["tasks"]:
            click.echo(f"pid {t['pid']} ({t['comm']}): {t['threads']} thread(s), "
                       f"{t['fds']} fd(s), {t['mappings']} mapping(s)")
        if report["policy"].get("from_crrun"):
            click.echo(f"crcheck: policy {report['policy']['source']} (crrun started pid "
                       f"{report['policy']['from_crrun']} with it)")
        for f in report["findings"]:
            if verbose or f["status"] != "supported" or f["skipped"]:
                click.echo(f"  {f['line']}")
        if report["checkpointable"]:
            click.echo(f"crcheck: pid {pid} can be checkpointed")
        else:
            click.echo(f"crcheck: pid {pid} cannot be checkpointed: "
                       f"{len(report['problems'])} problem(s)")
    sys.exit(0 if report["checkpointable"] else 6)


if __name__ == "__main__":
    main()

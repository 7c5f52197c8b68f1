"""crcheckpoint: freeze a process tree and write its statefile."""

from __future__ import annotations

import json
import sys
import time

import click

from . import __version__
from .errors import CrelfError


class _Progress:
    """A progress bar on stderr, only on a terminal and only for dumps over a second."""

    def __init__(self):
        self.start = time.monotonic()
        self.done = 0
        self.last = 0.0
        self.enabled = sys.stderr.isatty()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.start > 1.0 and now - self.last > 0.2:
            self.last = now
            rate = self.done / (now - self.start) / 2**20
            click.echo(f"\rcrcheckpoint: {self.done / 2**20:9.0f} MiB written, {rate:6.0f} MiB/s",
                       err=True, nl=False)

    def finish(self) -> None:
        if self.enabled and self.last:
            click.echo("", err=True)


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Statefile to write (created atomically, mode 0600).")
@click.option("--kill", is_flag=True, help="Terminate the whole tree after a successful write.")
@click.option("--fsync", is_flag=True, help="Flush the statefile to disk before renaming it.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.version_option(__version__, prog_name="crcheckpoint")
def main(pid: int, output: str, kill: bool, fsync: bool, as_json: bool) -> None:
    """Checkpoint process PID and all its descendants into one ELF statefile.

    The tree is frozen while its state is written, then runs on unharmed
    (or is killed with --kill).  Exit codes: 0 success, 3 target cannot be
    checkpointed, 4 statefile cannot be written, 1 other errors.
    """
    from .checkpoint import checkpoint

    progress = _Progress()
    summary = run_cli(lambda: checkpoint(pid, output, kill=kill, fsync=fsync,
                                         progress=progress), prog="crcheckpoint")
    progress.finish()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"crcheckpoint: pid {pid}: {len(summary['pids'])} task(s), "
                   f"{summary['threads']} thread(s), {summary['bytes_stored'] / 2**20:.1f} MiB "
                   f"stored in {summary['statefile']} "
                   f"(frozen {summary['frozen_seconds'] * 1000:.0f} ms)"
                   + ("; tree killed" if kill else ""))


if __name__ == "__main__":
    main()

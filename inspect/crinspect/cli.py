"""crinspect: show what a crelf statefile holds, check it, extract gdb cores.

Exit codes, the same for every subcommand: 0 success; 1 verify found
checksum problems in a statefile it could read (or another failure); 2 bad
usage; 4 output cannot be written; 5 not a readable statefile (missing, not
ELF, a plain core such as gcore's, truncated, corrupted notes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import click
import msgspec

from statefile import __version__
from statefile.format import reader
from statefile.errors import CrelfError, FormatError

from . import model, render, shared as shared_view, views
from .corefile import write_core

PROG = "crinspect"


class _DefaultGroup(click.Group):
    """`crinspect FILE ...` is `crinspect summary FILE ...`."""

    def parse_args(self, ctx, args):
        first = next((a for a in args if not a.startswith("-")), None)
        if first is not None and first not in self.commands:
            args = ["summary", *args]
        return super().parse_args(ctx, args)


def _load(path: str):
    sf = reader.load(path)
    problems = model.note_problems(sf)
    if problems:
        click.echo(f"{PROG}: warning: {path}: {problems[0]}"
                   + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                   + f"; run `{PROG} verify`", err=True)
    return sf


def _emit(view: views.View, as_json: bool, lines) -> None:
    """Print a view (views.py): as JSON (its schema: `crinspect schema`), or as text."""
    if as_json:
        click.echo(views.encode(view))
    else:
        for line in lines():
            click.echo(line)


def _common(fn):
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print machine-readable JSON on stdout.")(fn)
    return click.argument("statefile", metavar="STATEFILE")(fn)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """Show what a crelf statefile holds, without gdb.

    `crinspect STATEFILE` prints the summary; the subcommands show one part.
    Every reporting command takes --json.

    \b
    Exit codes (the same for every subcommand, verify included):
      0  success
      1  verify found checksum problems in a statefile it could read,
         or another failure
      2  bad usage
      4  output not writable
      5  not a readable statefile: missing, not ELF, a plain core (gcore),
         truncated, corrupted notes
    """


@cli.command()
@_common
def summary(statefile: str, as_json: bool) -> None:
    """Everything: header, process tree, threads, memory, fds, shared objects (the default)."""
    sf = _load(statefile)
    s = model.summary(sf, statefile)

    def lines():
        yield from render.header(s.header, statefile)
        for title, part in (("process tree", render.ps(s.tasks)),
                            ("threads", render.threads(s.threads)),
                            ("memory", render.memory(s.memory)),
                            ("files", render.files(s.files)),
                            ("shared objects", shared_view.render(s.shared))):
            yield ""
            yield title
            yield from part

    _emit(s, as_json, lines)


@cli.command()
@_common
def ps(statefile: str, as_json: bool) -> None:
    """The process tree: pid, ppid, pgid, sid, uid, command line."""
    tasks = model.ps(_load(statefile))
    _emit(views.PsView(statefile=statefile, tasks=tasks), as_json, lambda: render.ps(tasks))


@cli.command()
@_common
def threads(statefile: str, as_json: bool) -> None:
    """Every thread: the symbol its instruction pointer is in, its syscall."""
    ths = model.threads(_load(statefile))
    _emit(views.ThreadsView(statefile=statefile, threads=ths), as_json, lambda: render.threads(ths))


@cli.command()
@_common
def mem(statefile: str, as_json: bool) -> None:
    """Every mapping of every task: range, perms, kind, size and bytes stored."""
    maps = model.memory(_load(statefile))
    _emit(views.MemView(statefile=statefile, memory=maps), as_json, lambda: render.memory(maps))


@cli.command()
@_common
def files(statefile: str, as_json: bool) -> None:
    """The fd table of every task: kind, path or target, flags, offset."""
    fds = model.files(_load(statefile))
    _emit(views.FilesView(statefile=statefile, files=fds), as_json, lambda: render.files(fds))


@cli.command()
@_common
def shared(statefile: str, as_json: bool) -> None:
    """Objects tasks share, and who holds them: pipes, FIFOs, sockets, ptys,
    SysV IPC, shared memory, open files held by several fds.

    \b
    Every pipe, FIFO and socket is listed (even with one end only in the
    tree), every SysV IPC object, every MAP_SHARED object mapped more than
    once, and any other open file description held by several fds.
    --json prints {"statefile": ..., "objects": [OBJECT, ...]}; OBJECT has
    "object" (its class: pipe, unix-pair, unix-listen, unix-socket, socket,
    pty, sysv-shm, sysv-sem, sysv-msg, shared-memory, file), "kind", "id"
    (unique in the file), "pids" and "holders", a list of
      {"pid", "fd", "file" (CR_FILES id), "role", "start", "end", "perms"}
    and the keys of its class: docs/CRINSPECT-JSON.md, `crinspect schema`.
    """
    objs = shared_view.objects(_load(statefile))
    _emit(views.SharedView(statefile=statefile, objects=objs), as_json,
          lambda: shared_view.render(objs))


@cli.command()
@_common
def notes(statefile: str, as_json: bool) -> None:
    """Every ELF note: owner, type name and size."""
    ns = model.note_list(_load(statefile))
    _emit(views.NotesView(statefile=statefile, notes=ns), as_json, lambda: render.notes(ns))


@cli.command()
@_common
def verify(statefile: str, as_json: bool) -> None:
    """Check the ELF layout, every note checksum and every chunk of segment data.

    Exit 0 when every checksum matches, 1 when some do not, 5 (like every
    other subcommand) when the file is not a readable statefile at all.
    """
    try:
        # the ELF layout first, every problem of it (the check crrestart's loader
        # makes, reader.layout_problems), then the notes and every chunk
        layout = reader.layout_problems_of(statefile)
        if layout:
            raise FormatError(f"{statefile}: corrupted statefile ({layout[0]})"
                              + (f" and {len(layout) - 1} more layout problem(s): "
                                 + "; ".join(layout[1:]) if len(layout) > 1 else ""))
        sf = reader.load(statefile)
    except CrelfError as e:
        if as_json:
            click.echo(views.encode(views.VerifyView(statefile=statefile, ok=False,
                                                     problems=[str(e)])))
        raise click.exceptions.Exit(_fail(str(e), e.exit_code))
    problems = reader.verify(sf)
    result = views.VerifyView(statefile=statefile, ok=not problems, problems=problems,
                              notes=len(sf.notes), segments=len(sf.segments))
    _emit(result, as_json, lambda: (
        [f"{statefile}: OK ({len(sf.notes)} notes, {len(sf.segments)} segments checked)"]
        if not problems else [f"{statefile}: {len(problems)} problem(s):"]
        + [f"  {p}" for p in problems]))
    if problems:
        raise click.exceptions.Exit(_fail(f"{statefile}: {len(problems)} problem(s) found", 1))


@cli.command()
@_common
@click.option("--pid", type=int, help="Task to extract (default: the root task).")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Core file to write (mode 0600).")
def core(statefile: str, as_json: bool, pid: int | None, output: str) -> None:
    """Write a standalone gdb core file of one task of the tree."""
    sf = _load(statefile)
    res = write_core(sf, sf.root.pid if pid is None else pid, output)
    _emit(res, as_json, lambda: [
        f"{output}: core of pid {res.pid} ({res.threads} thread(s), "
        f"{res.segments} segments, {render.size(res.bytes_stored)} stored); "
        f"open it with: gdb {res.exe or 'PROGRAM'} -c {output}"])


@cli.command("gdb", context_settings={"ignore_unknown_options": True})
@click.argument("statefile", metavar="STATEFILE")
@click.option("--pid", type=int, help="Task to debug (default: the root task).")
@click.argument("gdb_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- GDB ARGS]")
def gdb(statefile: str, pid: int | None, gdb_args: tuple[str, ...]) -> None:
    """Run gdb on the task's executable with the statefile (or its core) as core."""
    sf = _load(statefile)
    gdb_bin = shutil.which("gdb")
    if gdb_bin is None:
        raise CrelfError("gdb is not installed")
    task = sf.root if pid is None else next((t for t in sf.tasks if t.pid == pid), None)
    if task is None:
        raise CrelfError(f"no task {pid} in {statefile}")
    exe = [task.exe] if task.exe and os.path.isfile(task.exe) else []
    if task is sf.root:
        sys.stdout.flush()
        os.execv(gdb_bin, ["gdb", *exe, "-c", statefile, *gdb_args])
    with tempfile.TemporaryDirectory(prefix="crinspect-") as tmp:
        path = os.path.join(tmp, f"{task.pid}.core")
        write_core(sf, task.pid, path)
        rc = subprocess.call([gdb_bin, *exe, "-c", path, *gdb_args])
    raise click.exceptions.Exit(rc)


@cli.command()
@click.option("--view", type=click.Choice(list(views.VIEWS)),
              help="The schema of one view only (default: the document of every view).")
def schema(view: str | None) -> None:
    """Print the JSON Schema of `--json` output (docs/CRINSPECT-JSON.md).

    \b
    Made from the output types (inspect/crinspect/views.py) and the statefile's
    records they embed; docs/crinspect-schema.json is this output, committed.
    """
    doc = views.schema()
    out = doc if view is None else views.view_schema(doc, view)
    click.echo(msgspec.json.format(msgspec.json.encode(out), indent=2).decode())


def _fail(message: str, code: int) -> int:
    click.echo(f"{PROG}: error: {message}", err=True)
    return code


def main() -> None:
    try:
        cli.main(prog_name=PROG, standalone_mode=True)
    except CrelfError as e:
        sys.exit(_fail(str(e), e.exit_code))
    except KeyboardInterrupt:
        sys.exit(_fail("interrupted", 130))
    except OSError as e:
        sys.exit(_fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 1))
    except Exception as e:  # a corrupted but loadable statefile: no traceback
        if os.environ.get("CRINSPECT_DEBUG"):
            raise
        sys.exit(_fail(f"cannot read the statefile ({type(e).__name__}: {e}); "
                       f"try `{PROG} verify`", 5))


if __name__ == "__main__":
    main()

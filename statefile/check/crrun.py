"""crrun: run a program under crelf's checkpointability monitor.

    crrun [--strict] [--policy FILE] [--json-log FILE] -- COMMAND [ARG]...

COMMAND and everything it starts run under a seccomp filter that reports the
few syscalls creating state crelf cannot checkpoint (see statefile/check/monitor.py).
Each one is recorded as a flag on the task (crcheck, crcheckpoint and
crinspect show them) and announced on stderr; with --strict the syscall fails
with an errno instead, so the program stays checkpointable.

--policy FILE: the crelf policy (TOML, statefile/check/policy.py) the program runs
under.  It is validated fully (exit 2 with one line when it is not valid).  A
watched creation whose resource class the policy skips (e.g. an io_uring under
``skip = ["io_uring"]``) is allowed even with --strict, recorded as a flag
marked skippable by that policy, and not announced on stderr.  The policy's
path is recorded for the started task, so a later crcheck or crcheckpoint of
it (or of a descendant) uses that policy when given no --policy of its own.

Exit status: COMMAND's own status; 128+N when it was killed by signal N;
125 when crrun itself failed, 126 when COMMAND cannot be executed, 127 when it
is not found (the conventions of env(1) and timeout(1)).  SIGINT, SIGTERM,
SIGHUP and SIGQUIT sent to crrun are forwarded to COMMAND.

When COMMAND exits while processes it started are still running, crrun exits
with COMMAND's status at once and leaves a background monitor process that
keeps watching them until the last one is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click

from statefile.check import flags, monitor
from statefile.check import policy as pol

EXIT_CRRUN_FAILED, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND = 125, 126, 127
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: how long to wait, after COMMAND exited, for the listener to hang up before
#: concluding that descendants are still running
HANGUP_GRACE = 0.2


def _fail(msg: str, code: int = EXIT_CRRUN_FAILED):
    click.echo(f"crrun: {msg}", err=True)
    sys.exit(code)


def _exit_status(returncode: int) -> int:
    """Popen.returncode -> a shell-style exit status."""
    return 128 - returncode if returncode < 0 else returncode


def _check_policy(path: str) -> pol.Policy:
    """Validate the policy file fully (statefile.check.policy.load); exit 2 with one
    line when it is not a valid policy."""
    try:
        p = pol.load(path)
    except pol.PolicyError as e:
        _fail(str(e), 2)
    p.source = os.path.abspath(path)
    return p


def _detach_monitor(mon: monitor.Monitor) -> None:
    """Hand the listener to a background process that serves it until the
    remaining descendants are gone; return in the parent.

    Called only after the monitor thread was stopped and joined, so this
    process is single-threaded when it forks."""
    if os.fork() != 0:
        return
    try:
        os.setsid()  # out of the terminal's process group: Ctrl-C is for the program
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # keep stderr: the monitor reports there
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        mon.run()
    finally:
        os._exit(0)


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "allow_interspersed_args": False,
                                 "ignore_unknown_options": False})
@click.option("--strict", is_flag=True,
              help="Make the watched syscalls fail (io_uring_setup: ENOSYS, socket: "
                   "EAFNOSUPPORT, others: EPERM) so the program stays checkpointable; "
                   "with --policy, only those whose class the policy does not skip.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A crelf policy (TOML: skip, dump_tmpfs, on_unsupported), validated here. "
                   "Creations of a class it skips are allowed (even with --strict), "
                   "recorded as skippable and not announced; crcheck and crcheckpoint of "
                   "the program use this policy when given no --policy. Also exported to "
                   "the program as CRELF_POLICY.")
@click.option("--json-log", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append one JSON line per event to FILE.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def main(strict: bool, policy_file: str | None, json_log: str | None,
         command: tuple[str, ...]) -> None:
    """Run COMMAND under crelf's monitor, flagging state that cannot be checkpointed.

    \b
    With --policy FILE, what the policy skips is allowed and only recorded:
    --strict then makes fail only the creations the policy does not cover,
    and a later crcheck/crcheckpoint of the program (or of a process it
    started) without --policy uses FILE.
    """
    env = dict(os.environ)
    policy = _check_policy(policy_file) if policy_file else None
    if policy:
        env["CRELF_POLICY"] = policy.source
    env["CRELF_CRRUN"] = "strict" if strict else "flag"
    if json_log:
        json_log = os.path.abspath(json_log)
        try:
            open(json_log, "a").close()
        except OSError as e:
            _fail(f"--json-log {json_log}: {e.strerror}")
    flags.clear_stale()  # old flag files of tasks long gone

    child: list = []  # the Popen, once started

    def forward(signum, _frame):
        if not child:
            sys.exit(_exit_status(-signum))  # nothing started yet
        try:
            child[0].send_signal(signum)
        except ProcessLookupError:
            pass
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)

    try:
        proc, listener = monitor.launch(list(command), env=env)
    except FileNotFoundError:
        _fail(f"{command[0]}: command not found", EXIT_NOT_FOUND)
    except PermissionError as e:
        _fail(f"{command[0]}: {e.strerror}", EXIT_CANNOT_EXEC)
    except OSError as e:
        _fail(f"cannot start {command[0]}: {e.strerror or e}")
    except subprocess.SubprocessError as e:  # the filter could not be installed
        _fail(f"cannot start {command[0]} under the monitor: {e}")

    child.append(proc)
    if policy:
        try:
            pol.record_crrun(proc.pid, policy.source)
        except OSError as e:
            click.echo(f"crrun: cannot record the policy for pid {proc.pid}: "
                       f"{e.strerror or e}", err=True)
    mon = monitor.Monitor(listener, strict=strict, json_log=json_log,
                          skip=policy.skip if policy else set(),
                          policy_file=policy.source if policy else None)
    thread = monitor.start_thread(mon)

    status = _exit_status(proc.wait())
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the program is gone: nothing to forward to

    thread.join(HANGUP_GRACE)
    if thread.is_alive():       # descendants still run: keep them watched
        mon.stop()
        thread.join()
        if not thread.hung_up:
            _detach_monitor(mon)
    mon.close()
    sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()

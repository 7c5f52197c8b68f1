"""`crinspect ... --json` has a published schema other tools can rely on
(docs/CRINSPECT-JSON.md, docs/crinspect-schema.json, issue 15 item 3).

A real tree is checkpointed (a parent with two threads and a child sharing a
pipe with bytes in flight, a unix socket pair with a message queued, a
listening unix socket, a pseudo-terminal pair with input queued, an eventfd
on two fds, MAP_SHARED anonymous memory and an open log file), then every view's JSON
must decode strictly into its output type (inspect/crinspect/views.py: an
unknown key is refused) and validate against the committed schema, which
must be what `crinspect schema` generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import msgspec
import pytest
from helpers import descendants, require_root, wait_for_line
from test_crinspect import checkpoint, crinspect

from crinspect import views

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "crinspect-schema.json"

TREE = r'''
import mmap, os, socket, sys, threading, time
d = sys.argv[1]
r, w = os.pipe()
a, b = socket.socketpair()
lst = socket.socket(socket.AF_UNIX)
lst.bind(os.path.join(d, "l.sock"))
lst.listen()
m, s = os.openpty()
shm = mmap.mmap(-1, 8192, mmap.MAP_SHARED)
shm[:5] = b"hello"
log = open(os.path.join(d, "log"), "a")
os.write(w, b"in flight")
a.send(b"queued")
os.write(m, b"typed\n")
if os.fork() == 0:
    while True:
        time.sleep(1)
efd = os.eventfd(3)    # (shared with a child it is refused: one task, two fds)
efd2 = os.dup(efd)
threading.Thread(target=lambda: time.sleep(10 ** 6), daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(1)
'''


@pytest.fixture
def tree_cr(procs, tmp_path):
    require_root()
    prog = tmp_path / "tree.py"
    prog.write_text(TREE)
    out = tmp_path / "tree.out"
    proc = procs.spawn([sys.executable, prog, tmp_path], stdout=out,
                       stderr=tmp_path / "tree.err")
    wait_for_line(out, "ready", proc=proc)
    (child,) = descendants(proc.pid)
    cr = tmp_path / "tree.cr"
    checkpoint(proc.pid, cr)
    return proc.pid, child, cr


def published() -> dict:
    return json.loads(SCHEMA.read_text())


def run_json(*args) -> bytes:
    res = crinspect(*args, "--json")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout.encode()


def check_view(name: str, out: bytes, schema: dict):
    """The view's JSON decodes strictly into its type and validates against
    the published schema; returns the decoded view."""
    view = msgspec.json.decode(out, type=views.VIEWS[name])
    jsonschema.validate(json.loads(out), views.view_schema(schema, name))
    return view


def test_the_published_schema_is_the_generated_one():
    res = crinspect("schema")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert json.loads(res.stdout) == published() == json.loads(json.dumps(views.schema())), \
        "docs/crinspect-schema.json is stale: regenerate it with `crinspect schema`"
    jsonschema.Draft202012Validator.check_schema(published())
    for name in views.VIEWS:
        one = crinspect("schema", "--view", name)
        assert one.returncode == 0 and json.loads(one.stdout) == views.view_schema(
            published(), name)
    # every view is documented
    doc = (SCHEMA.parent / "CRINSPECT-JSON.md").read_text()
    for name, t in views.VIEWS.items():
        assert f"`{t.__name__}`" in doc, name


def test_every_view_of_a_real_tree_decodes_strictly_and_validates(tree_cr, tmp_path):
    parent, child, cr = tree_cr
    schema = published()

    summary = check_view("summary", run_json(cr), schema)
    assert {t.pid for t in summary.tasks} == {parent, child}

    ps = check_view("ps", run_json("ps", cr), schema)
    assert [(t.pid, t.depth, t.threads) for t in ps.tasks] == [(parent, 0, 2), (child, 1, 1)]
    assert ps.tasks == summary.tasks

    ths = check_view("threads", run_json("threads", cr), schema)
    assert sorted(t.pid for t in ths.threads) == sorted([parent, parent, child])

    mem = check_view("mem", run_json("mem", cr), schema)
    assert any(m.perms.endswith("s") and m.size == 8192 for m in mem.memory)

    fds = check_view("files", run_json("files", cr), schema)
    kinds = {f.kind for f in fds.files}
    assert {"pipe", "socket", "pty-master", "pty-slave", "anon:eventfd", "regular"} <= kinds
    assert all((f.socket is not msgspec.UNSET) == (f.kind == "socket") for f in fds.files)

    shared = check_view("shared", run_json("shared", cr), schema)
    by_class = {}
    for o in shared.objects:
        by_class.setdefault(type(o), []).append(o)
    (pipe,) = by_class[views.PipeObject]
    assert pipe.bytes == len(b"in flight") and pipe.pids == sorted([parent, child])
    (pair,) = by_class[views.UnixPairObject]
    assert sorted(e.queued for e in pair.ends) == [0, len(b"queued")]
    (listen,) = by_class[views.UnixListenObject]
    assert listen.name == str(tmp_path / "l.sock")
    (pty,) = by_class[views.PtyObject]
    assert pty.master and pty.pids == sorted([parent, child])
    assert any(o.size == 8192 for o in by_class[views.SharedMemoryObject])
    files = {o.kind: o for o in by_class[views.FileObject]}
    assert files["anon:eventfd"].details["anon"]["count"] == 3
    assert files["regular"].path == str(tmp_path / "log")
    assert shared.objects == summary.shared

    notes = check_view("notes", run_json("notes", cr), schema)
    assert {"CR_HEADER", "CR_TASK", "CR_FILES", "NT_PRSTATUS"} <= {n.name for n in notes.notes}

    ok = check_view("verify", run_json("verify", cr), schema)
    assert ok.ok and ok.notes == len(notes.notes)

    core = check_view("core", run_json("core", cr, "--pid", child,
                                       "-o", tmp_path / "child.core"), schema)
    assert core.pid == child and core.threads == 1 and Path(core.core).is_file()


def test_a_failed_verify_has_the_same_schema(tmp_path):
    bad = tmp_path / "bad.cr"
    bad.write_text("not a statefile\n")
    res = crinspect("verify", bad, "--json")
    assert res.returncode == 5
    v = check_view("verify", res.stdout.encode(), published())
    assert not v.ok and v.notes is msgspec.UNSET and len(v.problems) == 1


def test_an_unknown_key_is_refused(tree_cr):
    """Strict decoding is what makes the checks above able to fail: a key the
    schema does not define fails both the typed decode and the schema."""
    _, _, cr = tree_cr
    data = json.loads(run_json("ps", cr))
    data["tasks"][0]["surprise"] = 1
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        msgspec.json.decode(json.dumps(data), type=views.PsView)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, views.view_schema(published(), "ps"))

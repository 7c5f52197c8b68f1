"""docs/FORMAT.md and the record definitions (statefile/format/records.py)
cannot drift apart: the page's reference of records is generated from them,
every field has a description, and the hand-written CR_TASK table names
exactly the fields of the task record."""

from __future__ import annotations

import re

import msgspec.inspect as mi

from statefile.format import notes as nt
from statefile.format import recorddoc, records


def test_reference_of_records_is_the_generated_one():
    assert recorddoc.current() == recorddoc.render(), \
        "docs/FORMAT.md is out of date: run python -m statefile.format.recorddoc --write"


def _all_records():
    seen, queue = [], [k.record for k in nt.NOTE_KINDS if k.record is not None]
    while queue:
        cls = queue.pop()
        if cls in seen:
            continue
        seen.append(cls)
        recorddoc._record(cls, queue)       # (queues the records its fields hold)
    return seen


def test_every_record_and_field_is_described():
    found = _all_records()
    assert records.TaskNote in found and records.UnixSocket in found \
        and records.Segment in found and len(found) > 60
    bare = [f"{cls.__name__}.{f.name}" for cls in found for f in mi.type_info(cls).fields
            if not recorddoc._unwrap(f.type)[1]]
    assert not bare, f"fields without a description: {bare}"
    assert not [c.__name__ for c in found if not (c.__doc__ or "").strip()]


def test_the_task_table_names_the_task_record_fields():
    text = recorddoc.FORMAT_MD.read_text()
    table = text[text.index("#### CR_TASK"):text.index("#### CR_THREAD_REGS")]
    named = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            named |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    fields = {f.encode_name for f in mi.type_info(records.TaskNote).fields} - {"v"}
    assert named == fields, (f"in the table, not in TaskNote: {sorted(named - fields)}; "
                             f"in TaskNote, not in the table: {sorted(fields - named)}")

"""fanotify groups: their init flags and every mark, from /proc/PID/fdinfo.

    fanotify flags:12 event-flags:8000
    fanotify ino:21c68b sdev:fe00000 mflags:0 mask:3b ignored_mask:0 fhandle-bytes:8 ...
    fanotify mnt_id:1b mflags:40 mask:0 ignored_mask:3
    fanotify sdev:fe00000 mflags:0 mask:8 ignored_mask:0

`flags` are fanotify_init's flags (FAN_CLASS_*, FAN_NONBLOCK, FAN_UNLIMITED_*,
FAN_REPORT_*), `event-flags` the open flags of the fds events carry.  Each
further line is a mark: an inode mark (named by file handle, turned into a
path here as for inotify watches), a mount mark (a mount id, turned into its
mount point as the task sees it) or a filesystem mark (a device, turned into
the mount point of one of its mounts).  `mflags` are FAN_MARK_* flags
(FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE).
Restored by restorer/restore/fanotify.py: fanotify_init, then each mark
added again on its path.  Events queued but not read cannot be read without
consuming them: like inotify's, their byte count is saved as `unread` and the
checkpoint refused (fd:fanotify-unread) unless policy 'notify-events' lets the
restarted group start with an empty queue.  Permission-class groups
(FAN_CLASS_CONTENT, FAN_CLASS_PRE_CONTENT) are refused too: a restart cannot
give back a permission event a task is answering.
"""

from __future__ import annotations

from statefile.control import procfs
from statefile.dump.anon import _fields, _handle_path, _unread_bytes

FAN_CLASS_MASK = 0x0C     # FAN_CLASS_CONTENT 0x04, FAN_CLASS_PRE_CONTENT 0x08


def _mount_point(pid: int, mnt_id: int | None = None, sdev: int | None = None) -> str | None:
    dev = None if sdev is None else f"{sdev >> 20}:{sdev & 0xFFFFF}"
    for line in procfs.read(f"/proc/{pid}/mountinfo").splitlines():
        f = line.split()
        if (mnt_id is not None and int(f[0]) == mnt_id) or (dev is not None and f[2] == dev):
            return f[4].replace("\\040", " ")
    return None


def parse(pid: int, fd: int, lines: list[str]) -> dict:
    """The `anon` record of a fanotify fd."""
    out: dict = {"marks": []}
    for line in lines:
        if not line.startswith("fanotify "):
            continue
        f = _fields(line[len("fanotify "):])
        if "flags" in f and "event-flags" in f:
            out["flags"], out["event_flags"] = int(f["flags"], 16), int(f["event-flags"], 16)
            continue
        mark = {"mflags": int(f.get("mflags", "0"), 16), "mask": int(f.get("mask", "0"), 16),
                "ignored_mask": int(f.get("ignored_mask", "0"), 16)}
        if "ino" in f:
            mark["type"] = "inode"
            mark["ino"] = int(f["ino"], 16)
            mark["path"] = _handle_path(pid, int(f["sdev"], 16), int(f["fhandle-type"], 16),
                                        bytes.fromhex(f["f_handle"]))
        elif "mnt_id" in f:
            mark["type"] = "mount"
            mark["path"] = _mount_point(pid, mnt_id=int(f["mnt_id"], 16))
        elif "sdev" in f:
            mark["type"] = "filesystem"
            mark["path"] = _mount_point(pid, sdev=int(f["sdev"], 16))
        else:
            continue
        out["marks"].append(mark)
    unread = _unread_bytes(pid, fd)
    if unread:
        out["unread"] = unread
    return out


def problem(rec) -> str | None:
    """Why a fanotify group (its records.FanotifyState) cannot be restored, or None."""
    if rec.flags & FAN_CLASS_MASK:
        return "a permission-class group (FAN_CLASS_CONTENT or PRE_CONTENT)"
    lost = [m for m in rec.marks if not m.path]
    if lost:
        return f"the object of {len(lost)} mark(s) was not found (deleted, or not visible)"
    return None

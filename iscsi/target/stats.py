"""What ``iscsi-target stats``, ``status`` and ``lun list`` compute from the daemon's rows.

Per-session I/O rates for ``iscsi-target stats``, from two ``status`` samples (as iostat does).

The daemon keeps only counters since each login (commands, bytes received, bytes sent: see
``TargetSession.stats``) and its own monotonic clock; a rate is the difference of two samples
divided by the daemon-clock time between them, so the admin command's own delays do not
skew it.  And for ``lun list``: how much of each thin image is allocated, and whether the
LUNs on one filesystem could outgrow it.  Pure functions on the daemon's dicts: no I/O here.
"""
from __future__ import annotations

from typing import Any

#: A session is the same one in two samples when these match (a re-login gets a new TSIH).
_KEY_FIELDS = ("target", "initiator", "isid", "tsih")


def _key(session: dict[str, Any]) -> tuple:
    return tuple(session.get(k) for k in _KEY_FIELDS)


def _counters(session: dict[str, Any]) -> dict[str, float]:
    st = session.get("stats") or {}
    return {k: float(st.get(k, 0) or 0) for k in ("commands", "rx_bytes", "tx_bytes", "seconds")}


def rates(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per session in ``after``: commands/s and MB/s received and sent since ``before``.

    A session that logged in between the samples is measured from its login (its counters
    started at zero then); one that ended is not listed.  Counters that went backwards (the
    daemon restarted between samples) are measured from zero as well.
    """
    elapsed = float(after.get("clock", 0)) - float(before.get("clock", 0))
    earlier = {_key(s): _counters(s) for s in before.get("sessions") or []}
    rows = []
    for s in after.get("sessions") or []:
        now = _counters(s)
        was = earlier.get(_key(s))
        if was is None or elapsed <= 0 or any(now[k] < was[k] for k in now):
            was = {k: 0.0 for k in now}
            span = now["seconds"]
        else:
            span = elapsed
        span = span if span > 0 else float("inf")
        rows.append({
            "target": s.get("target"),
            "initiator": s.get("initiator"),
            "tsih": s.get("tsih"),
            "type": s.get("type"),
            "cmds_per_s": (now["commands"] - was["commands"]) / span,
            "rx_mb_per_s": (now["rx_bytes"] - was["rx_bytes"]) / span / 1e6,
            "tx_mb_per_s": (now["tx_bytes"] - was["tx_bytes"]) / span / 1e6,
        })
    rows.sort(key=lambda r: (str(r["target"]), str(r["initiator"]), r["tsih"] or 0))
    return rows


_LUN_COUNTERS = ("reads", "read_bytes", "writes", "written_bytes", "other_commands")


def lun_rates(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per LU in ``after``'s ``lun_io``: READs, WRITEs (any command that changes the
    medium) and other commands per second, and MB/s read and written, since ``before``.
    A LU opened between the samples, or whose counters went backwards (removed and added
    again, the daemon restarted), is measured from zero."""
    elapsed = float(after.get("clock", 0)) - float(before.get("clock", 0))
    span = elapsed if elapsed > 0 else float("inf")
    earlier = {(r.get("target"), r.get("lun")): r for r in before.get("lun_io") or []}
    rows = []
    for r in after.get("lun_io") or []:
        was = earlier.get((r.get("target"), r.get("lun"))) or {}
        if any(r.get(k, 0) < was.get(k, 0) for k in _LUN_COUNTERS):
            was = {}
        d = {k: (r.get(k, 0) - was.get(k, 0)) / span for k in _LUN_COUNTERS}
        rows.append({"target": r.get("target"), "lun": r.get("lun"), "reads_per_s": d["reads"],
                     "writes_per_s": d["writes"], "other_per_s": d["other_commands"],
                     "read_mb_per_s": d["read_bytes"] / 1e6, "write_mb_per_s": d["written_bytes"] / 1e6})
    return rows


def _rounded(row: dict[str, Any], whole: tuple[str, ...], tenths: tuple[str, ...]) -> dict[str, Any]:
    """``row`` for a table: the ``whole`` rates (per second) without decimals, the ``tenths``
    (MB/s) to 0.1."""
    return {**row, **{k: f"{row[k]:.0f}" for k in whole}, **{k: f"{row[k]:.1f}" for k in tenths}}


def display_lun(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` of :func:`lun_rates` rounded for a table."""
    return _rounded(row, ("reads_per_s", "writes_per_s", "other_per_s"), ("read_mb_per_s", "write_mb_per_s"))


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of ``rows`` as one more row (for the table's last line)."""
    return {
        "target": "TOTAL", "initiator": f"{len(rows)} session(s)", "tsih": None, "type": None,
        "cmds_per_s": sum(r["cmds_per_s"] for r in rows),
        "rx_mb_per_s": sum(r["rx_mb_per_s"] for r in rows),
        "tx_mb_per_s": sum(r["tx_mb_per_s"] for r in rows),
    }


def display(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` of :func:`rates` (or :func:`totals`) rounded for a table."""
    return _rounded(row, ("cmds_per_s",), ("rx_mb_per_s", "tx_mb_per_s"))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': counters in the status table."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def allocation(allocated: int | None, size: int | None) -> str:
    """'12.0 MiB (1%)': bytes a thin image has allocated, and its share of the LUN's size."""
    if allocated is None:
        return "-"
    if not size:
        return human_bytes(allocated)
    return f"{human_bytes(allocated)} ({100 * allocated / size:.0f}%)"


def overcommitted(luns: list[dict[str, Any]]) -> list[str]:
    """One warning per filesystem whose LUNs could grow by more than it has free.

    A thin LUN takes space as initiators write; when the filesystem is full, writes to
    unallocated blocks fail with DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
    (SBC-4 §4.7.3.7).  ``luns`` are ``lun list`` rows (``allocated``, ``fs_free``,
    ``fs_id``, ``size``, ``path``).
    """
    by_fs: dict[Any, list[dict[str, Any]]] = {}
    for lun in luns:
        if lun.get("fs_id") is not None and lun.get("allocated") is not None and lun.get("size"):
            by_fs.setdefault(lun["fs_id"], []).append(lun)
    warnings = []
    for group in by_fs.values():
        growth = sum(max(0, lun["size"] - lun["allocated"]) for lun in group)
        free = min(lun["fs_free"] for lun in group)  # one filesystem: the latest sample
        if growth > free:
            paths = ", ".join(sorted(lun["path"] for lun in group))
            warnings.append(
                f"thin provisioning: the LUN images on one filesystem ({paths}) can still grow by "
                f"{human_bytes(growth)} but it has {human_bytes(free)} free; once it is full, writes to "
                f"unallocated blocks fail (DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT)")
    return warnings

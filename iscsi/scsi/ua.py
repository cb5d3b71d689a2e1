"""Unit attention conditions, one queue per I_T nexus (SAM-5 §5.14, SPC-4 §5.14).

A nexus the logical unit has never seen has, by definition, a pending
POWER ON, RESET, OR BUS DEVICE RESET OCCURRED condition: the logical unit was
"powered on" before that initiator port could observe it.
"""
from __future__ import annotations

from collections import OrderedDict

from . import sense as S
from .types import ITNexus

# A handful of distinct conditions is all an initiator ever has queued; past this a new
# non-reset condition is not queued (SPC-4 §5.14 lets a device server discard UAs it
# cannot queue, as long as the reset class is kept).
MAX_PENDING_PER_NEXUS = 16
# Nexuses remembered per LU.  A forgotten nexus comes back as "never seen" and gets a
# POWER ON/RESET condition again, which initiators handle on login anyway.  open-iscsi
# makes one nexus per session; 4096 sessions to one LU is far beyond any real use.
MAX_NEXUSES = 4096

RESET_ASC = 0x29  # the POWER ON / RESET class, highest priority

# Conditions a reset (or an I_T nexus loss) does not imply, kept queued behind it: they tell
# of the medium and the target's configuration, which no reset restores, and initiators act
# on them only (Linux re-reads the capacity on 2A/09 and rescans LUNs on 3F/0E, never on a
# 29h condition).  Replaced by the reset, a LUN grown or removed by the admin while the
# initiator's connection was down went unnoticed for good.
SURVIVE_RESET = frozenset({
    S.CAPACITY_DATA_HAS_CHANGED,       # SBC-4 §4.6
    S.REPORTED_LUNS_DATA_HAS_CHANGED,  # SPC-4 §6.33
    S.INQUIRY_DATA_HAS_CHANGED,        # SPC-4 §6.6
})


class UnitAttentions:
    """Pending unit attention conditions per I_T nexus."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: OrderedDict[ITNexus, list[tuple[int, int]]] = OrderedDict()

    def get(self, nexus: ITNexus) -> list[tuple[int, int]] | None:
        """The nexus's queue (empty list: nothing pending), or None if never seen (hot path: one lookup)."""
        return self._pending.get(nexus)

    def _queue(self, nexus: ITNexus) -> list[tuple[int, int]]:
        q = self._pending.get(nexus)
        if q is None:
            q = self._pending[nexus] = [S.POWER_ON_RESET]
            if len(self._pending) > MAX_NEXUSES:
                self._pending.popitem(last=False)
        return q

    def known(self) -> list[ITNexus]:
        return list(self._pending)

    def peek(self, nexus: ITNexus) -> tuple[int, int] | None:
        q = self._queue(nexus)
        return q[0] if q else None

    def pop(self, nexus: ITNexus) -> tuple[int, int] | None:
        """Report (and so clear) the highest-priority condition of ``nexus``."""
        q = self._queue(nexus)
        self._pending.move_to_end(nexus)
        return q.pop(0) if q else None

    def clear(self, nexus: ITNexus, asc_ascq: tuple[int, int]) -> None:
        q = self._pending.get(nexus)
        if q and asc_ascq in q:
            q.remove(asc_ascq)

    def _add(self, q: list[tuple[int, int]], asc_ascq: tuple[int, int]) -> None:
        if asc_ascq[0] == RESET_ASC:
            # A reset supersedes what it implies (SPC-4 §5.14: the reset class is reported
            # first and the conditions it implies are not repeated); SURVIVE_RESET stays.
            q[:] = [asc_ascq] + [c for c in q if c in SURVIVE_RESET]
            return
        if asc_ascq in q:
            return
        if len(q) >= MAX_PENDING_PER_NEXUS:
            return
        q.append(asc_ascq)

    def establish(
        self,
        asc_ascq: tuple[int, int],
        *,
        nexus: ITNexus | None = None,
        except_nexus: ITNexus | None = None,
    ) -> None:
        """Queue a condition for one nexus, or for every known nexus but ``except_nexus``."""
        if nexus is not None:
            self._add(self._queue(nexus), asc_ascq)
            return
        for n, q in self._pending.items():
            if n != except_nexus:
                self._add(q, asc_ascq)

    def nexus_lost(self, nexus: ITNexus) -> None:
        """SAM-5 §6.3.4: after an I_T nexus loss the nexus next sees I_T NEXUS LOSS OCCURRED."""
        q = self._pending.get(nexus)
        if q is not None:
            self._add(q, S.I_T_NEXUS_LOSS)

    def forget(self, nexus: ITNexus) -> None:
        self._pending.pop(nexus, None)

    def __len__(self) -> int:
        return len(self._pending)

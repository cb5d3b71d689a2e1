"""The LUNs of one SCSI target device: dispatch by LUN, and answers for LUNs with no logical unit.

SPC-4 §6.33: REPORT LUNS is valid through any LUN.  For a LUN without a logical
unit (SPC-4 §6.6.2, SAM-5 §5.9.5): INQUIRY answers peripheral qualifier 011b /
device type 1Fh, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as its data, and
every other command ends in CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
"""
from __future__ import annotations

from typing import Awaitable, Iterable

from . import sense as S
from . import spc, vpd
from .cdb import MAX_LUN, Op, be16, decode_lun, encode_lun
from .lu import LogicalUnit
from .sense import SenseError, SenseKey, build_sense
from .types import ITNexus, ScsiCommand, ScsiResult, Status
from .ua import MAX_NEXUSES

__all__ = ["LunMap", "encode_lun", "decode_lun"]


class LunMap:
    """{LUN number: LogicalUnit} for one target (or one ACL's view of it)."""

    def __init__(self, luns: dict[int, LogicalUnit] | None = None) -> None:
        self._luns: dict[int, LogicalUnit] = {}
        # The I_T nexuses that have sent commands through this map: the ones whose LUN
        # inventory it is.  An LU shared by several maps (ACLs with their own mapping, open
        # access) knows the nexuses of all of them; a change to this map concerns only these.
        self._nexuses: dict[ITNexus, None] = {}  # insertion order: the oldest goes first
        self._last_nexus: ITNexus | None = None  # hot path: one identity test per command
        # The I_T nexuses of the sessions logged in through this map (nexus_joined until
        # nexus_lost): they can reach its LUs whether or not they have sent commands yet.
        self.joined: set[ITNexus] = set()
        for n, lu in (luns or {}).items():
            self._attach(n, lu)

    # -- membership ---------------------------------------------------------------------
    def _attach(self, number: int, lu: LogicalUnit) -> None:
        if not 0 <= number <= MAX_LUN:
            raise ValueError(f"LUN {number} out of range 0..{MAX_LUN}")
        self._luns[number] = lu
        lu.lun_numbers = self.numbers
        lu.served = True
        lu.map_added(self)

    def add(self, number: int, lu: LogicalUnit) -> None:
        """Map ``lu`` at ``number``; the nexuses using this map get REPORTED LUNS DATA HAS CHANGED."""
        if number in self._luns:
            raise ValueError(f"LUN {number} already mapped")
        self._attach(number, lu)
        self.report_luns_changed()

    def remove(self, number: int) -> LogicalUnit:
        lu = self._luns.pop(number)
        if lu not in self._luns.values():  # (not still mapped at another number)
            lu.map_removed(self)
        self.report_luns_changed()
        return lu

    def numbers(self) -> list[int]:
        return sorted(self._luns)

    def get(self, number: int) -> LogicalUnit | None:
        return self._luns.get(number)

    def __contains__(self, number: int) -> bool:
        return number in self._luns

    def __len__(self) -> int:
        return len(self._luns)

    def items(self):
        return self._luns.items()

    def logical_units(self) -> list[LogicalUnit]:
        return list(self._luns.values())

    # -- dispatch ---------------------------------------------------------------------------
    def data_out_length(self, lun: int, cdb: bytes) -> int | None:
        lu = self._luns.get(lun)
        if lu is None:
            return 0  # the command will be refused: solicit nothing
        return lu.data_out_length(cdb)

    async def execute(self, cmd: ScsiCommand) -> ScsiResult:
        r = self.start(cmd)
        if r.__class__ is ScsiResult:
            return r  # type: ignore[return-value]
        return await r  # type: ignore[misc]

    def start(self, cmd: ScsiCommand) -> ScsiResult | Awaitable[ScsiResult]:
        """The result at once, or an awaitable of it (see :meth:`LogicalUnit.start`)."""
        nexus = cmd.nexus
        if nexus is not self._last_nexus:
            self._note(nexus)
        lu = self._luns.get(cmd.lun)
        if lu is not None:
            if cmd.cdb[0] == Op.REPORT_LUNS:
                return self._report_luns(lu, cmd)
            return lu.start(cmd)
        return self._no_lu(cmd)

    def read_now(self, lun: int, cdb: bytes, nexus: ITNexus, zero_copy: bool):
        """A SIMPLE READ(10)/(16)'s data (or failure) at once, or None: see
        :meth:`LogicalUnit.read_now`."""
        if nexus is not self._last_nexus:
            self._note(nexus)
        lu = self._luns.get(lun)
        return None if lu is None else lu.read_now(cdb, nexus, zero_copy)

    def write_now(self, lun: int, cdb: bytes, nexus: ITNexus, data) -> ScsiResult | None:
        """A SIMPLE WRITE(10)/(16) done at once, or None: see :meth:`LogicalUnit.write_now`."""
        if nexus is not self._last_nexus:
            self._note(nexus)
        lu = self._luns.get(lun)
        return None if lu is None else lu.write_now(cdb, nexus, data)

    def _report_luns(self, lu: LogicalUnit | None, cmd: ScsiCommand) -> ScsiResult:
        try:
            if lu is not None:
                lu.ua.peek(cmd.nexus)  # REPORT LUNS is a first contact too, but reports no UA
            result = spc.report_luns(lu, cmd, self.numbers())
        except SenseError as e:
            return ScsiResult(Status.CHECK_CONDITION, b"", e.to_bytes(lu.mode.d_sense if lu else False))
        # SPC-4 §6.33: the inventory is now known to this I_T nexus, so the condition is
        # cleared on every LU it reaches, not only the one REPORT LUNS went through (as tgt
        # does). Left on the others, each next command to them failed with it again and a
        # Linux initiator rescanned once per LUN.
        for other in self._luns.values():
            other.ua.clear(cmd.nexus, S.REPORTED_LUNS_DATA_HAS_CHANGED)
        return result

    def _no_lu(self, cmd: ScsiCommand) -> ScsiResult:
        cdb = cmd.cdb
        op = cdb[0]
        try:
            if op == Op.REPORT_LUNS:
                return self._report_luns(None, cmd)
            if op in (Op.INQUIRY, Op.REQUEST_SENSE):
                S.refuse_naca(cdb)
            if op == Op.INQUIRY:
                if cdb[1] & 0x01:
                    raise SenseError(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)
                return ScsiResult(data=vpd.unmapped_inquiry()[: be16(cdb, 3)])
            if op == Op.REQUEST_SENSE:
                data = build_sense(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED, descriptor=bool(cdb[1] & 1))
                return ScsiResult(data=data[: cdb[4]])
            raise SenseError(SenseKey.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)
        except SenseError as e:
            return ScsiResult(Status.CHECK_CONDITION, b"", e.to_bytes(False))

    # -- events -------------------------------------------------------------------------------
    def _note(self, nexus: ITNexus) -> None:
        self._last_nexus = nexus
        nexuses = self._nexuses
        if nexus not in nexuses:
            nexuses[nexus] = None
            if len(nexuses) > MAX_NEXUSES:  # sessions that ended without nexus_lost
                del nexuses[next(iter(nexuses))]

    def report_luns_changed(self) -> None:
        """REPORTED LUNS DATA HAS CHANGED on every LU of this map, for the nexuses that use
        this map (SPC-4 §6.33, libiscsi #153).

        Only those: the nexuses another map brings to a shared LU see an inventory that did
        not change, and a unit attention about it would fail their next command for nothing
        (LIO raises it per ACL too).  A nexus an LU has never seen gets POWER ON first anyway.
        """
        nexuses = self._nexuses
        for lu in self._luns.values():
            ua = lu.ua
            for nexus in nexuses:
                if ua.get(nexus) is not None:
                    ua.establish(S.REPORTED_LUNS_DATA_HAS_CHANGED, nexus=nexus)

    def nexus_joined(self, nexus: ITNexus) -> None:
        """A session that reaches these LUs logged in (see LogicalUnit.user_joined)."""
        self.joined.add(nexus)
        for lu in self._luns.values():
            if lu.sole_user is not None:
                lu.user_joined(nexus)

    def nexus_lost(self, nexus: ITNexus) -> None:
        self.joined.discard(nexus)  # first: the LUs below settle their sole user without it
        self._nexuses.pop(nexus, None)
        if self._last_nexus == nexus:
            self._last_nexus = None
        for lu in self._luns.values():
            lu.nexus_lost(nexus)

    def lun_reset(self, lun: int) -> bool:
        """LOGICAL UNIT RESET; False if there is no such LU (the TMF answers "LUN does not exist")."""
        lu = self._luns.get(lun)
        if lu is None:
            return False
        lu.lun_reset()
        return True

    def warm_reset(self) -> None:
        for lu in self._luns.values():
            lu.warm_reset()

    def cold_reset(self) -> None:
        for lu in self._luns.values():
            lu.cold_reset()

    def clear_task_set(self, lun: int, nexus: ITNexus, affected: Iterable[ITNexus] = ()) -> None:
        lu = self._luns.get(lun)
        if lu is not None:
            lu.clear_task_set(nexus, affected)

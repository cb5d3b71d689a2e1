"""Persistent reservations (SPC-4 §5.13) and RESERVE/RELEASE (SPC-2): state machine, access, UAs, APTPL."""
from __future__ import annotations

import json
import struct

import pytest

from iscsi.scsi import sense
from iscsi.scsi.pr import (
    PersistentReservations,
    PrInAction,
    PrOutAction,
    PrType,
    encode_iscsi_transport_id,
    nexus_matches,
    parse_iscsi_transport_id,
)
from iscsi.scsi.sense import SenseError, SenseKey
from iscsi.scsi.types import ITNexus, ScsiCommand, Status

TGT = "iqn.2024-01.org.sanstack:disk1"
PORT1 = f"{TGT},t,0x0001"
PORT2 = f"{TGT},t,0x0002"


def nexus(host: str, isid: str = "023d00000001", port: str = PORT1, rel: int = 1) -> ITNexus:
    return ITNexus(f"iqn.1994-05.com.example:{host},i,0x{isid}", port, rel)


A, B, C = nexus("a"), nexus("b"), nexus("c")
KA, KB, KC = 0xA1A1, 0xB2B2, 0xC3C3
ALL_TYPES = list(PrType)
AR_TYPES = {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
RO_TYPES = {PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY}

READ10 = bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0])


def prout_cdb(sa: int, pr_type: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return bytes([0x5F, sa, (scope << 4) | pr_type, 0, 0]) + length.to_bytes(4, "big") + b"\x00"


def basic_params(key: int = 0, sa_key: int = 0, *, spec_i_pt=False, all_tg_pt=False, aptpl=False) -> bytes:
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    return struct.pack(">QQ4xBxH", key, sa_key, flags, 0)


def prin_cdb(sa: int, alloc: int = 8192) -> bytes:
    return bytes([0x5E, sa, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\x00"


class Harness:
    """A fake logical unit around one PersistentReservations: records UAs and persisted states."""

    def __init__(self, **kw) -> None:
        self.uas: list[tuple[ITNexus | None, tuple[int, int], ITNexus | None]] = []
        self.saved: list[dict] = []
        kw.setdefault("persist", self.saved.append)
        self.pr = PersistentReservations(ua_sink=lambda *a: self.uas.append(a), **kw)

    async def out(self, nx, sa, key=0, sa_key=0, pr_type=0, *, scope=0, params=None, length=None, **flags):
        data = basic_params(key, sa_key, **flags) if params is None else params
        cdb = prout_cdb(sa, pr_type, scope, len(data) if length is None else length)
        return await self.pr.persistent_reserve_out(ScsiCommand(cdb, 0, nx, data_out=data))

    async def ok(self, nx, sa, key=0, sa_key=0, pr_type=0, **kw):
        res = await self.out(nx, sa, key, sa_key, pr_type, **kw)
        assert res.status == Status.GOOD, (PrOutAction(sa).name, res)
        return res

    async def register(self, nx, key, **kw):
        return await self.ok(nx, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, key, **kw)

    async def reserve(self, nx, key, pr_type):
        return await self.ok(nx, PrOutAction.RESERVE, key, 0, pr_type)

    async def prin(self, sa, alloc=8192, nx=A) -> bytes:
        res = await self.pr.persistent_reserve_in(ScsiCommand(prin_cdb(sa, alloc), 0, nx))
        assert res.status == Status.GOOD
        return bytes(res.data)

    async def keys(self) -> tuple[int, list[int]]:
        data = await self.prin(PrInAction.READ_KEYS)
        gen, length = struct.unpack_from(">II", data)
        return gen, [int.from_bytes(data[8 + i:16 + i], "big") for i in range(0, length, 8)]

    async def reservation(self) -> tuple[int, int] | None:
        """(key, type) of the reservation, None when there is none."""
        data = await self.prin(PrInAction.READ_RESERVATION)
        if struct.unpack_from(">I", data, 4)[0] == 0:
            return None
        assert data[21] >> 4 == 0  # LU_SCOPE
        return int.from_bytes(data[8:16], "big"), data[21] & 0x0F

    def can_read(self, nx) -> bool:
        return not self.pr.check_conflict(nx, READ10)

    def can_write(self, nx) -> bool:
        return not self.pr.check_conflict(nx, WRITE10)


@pytest.fixture
def h() -> Harness:
    return Harness()


def expect_sense(exc: pytest.ExceptionInfo, key: SenseKey, asc_ascq: tuple[int, int]) -> None:
    assert exc.value.key == key
    assert (exc.value.asc, exc.value.ascq) == asc_ascq


# ------------------------------------------------------------------ REGISTER
async def test_register_read_keys_and_generation(h):
    await h.register(A, KA)
    await h.register(B, KB)
    gen, keys = await h.keys()
    assert keys == [KA, KB] and gen == 2
    # REGISTER with the right key changes it; with the wrong one conflicts (libiscsi reregister_key_fails).
    await h.ok(A, PrOutAction.REGISTER, KA, KA + 1)
    res = await h.out(A, PrOutAction.REGISTER, 0, 0x77)
    assert res.status == Status.RESERVATION_CONFLICT and not res.sense
    gen, keys = await h.keys()
    assert keys == [KA + 1, KB] and gen == 3
    # Unregister with SA key zero.
    await h.ok(A, PrOutAction.REGISTER, KA + 1, 0)
    gen, keys = await h.keys()
    assert keys == [KB] and gen == 4


async def test_register_unregistered_nexus_rules(h):
    # Non-zero RESERVATION KEY from an unregistered nexus: conflict.
    assert (await h.out(A, PrOutAction.REGISTER, 5, 6)).status == Status.RESERVATION_CONFLICT
    # Zero SA key from an unregistered nexus: GOOD and nothing changes, generation included.
    await h.ok(A, PrOutAction.REGISTER, 0, 0)
    assert await h.keys() == (0, [])
    # REGISTER AND IGNORE EXISTING KEY ignores a wrong RESERVATION KEY.
    await h.ok(A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0xDEAD, KA)
    await h.ok(A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0xBEEF, KA + 5)
    assert (await h.keys())[1] == [KA + 5]


async def test_registration_is_per_i_t_nexus(h):
    a_other_isid = nexus("a", isid="023d00000002")
    a_other_port = nexus("a", port=PORT2, rel=2)
    await h.register(A, KA)
    assert h.pr.lookup(a_other_isid) is None
    assert h.pr.lookup(a_other_port) is None
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    assert not h.can_write(a_other_isid)
    assert not h.can_write(a_other_port)


async def test_all_tg_pt_registration_covers_every_target_port(h):
    await h.register(A, KA, all_tg_pt=True)
    a2 = nexus("a", port=PORT2, rel=2)
    assert h.pr.lookup(a2) is not None
    await h.reserve(A, KA, PrType.EXCLUSIVE_ACCESS)
    # The reservation holder is the registration, which covers the second target port too.
    assert h.can_write(a2) and h.can_read(a2)
    assert not h.can_read(B)
    status = await h.prin(PrInAction.READ_FULL_STATUS)
    assert status[8 + 12] == 0x03  # ALL_TG_PT and R_HOLDER


async def test_parameter_list_length_must_be_24(h):
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER, 0, KA, params=basic_params(0, KA) + b"\0" * 4)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.RESERVE, 0, 0, 1, params=b"\0" * 23)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)
    # CDB asks for 24 bytes, initiator sent fewer.
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER, params=b"\0" * 10, length=24)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)


async def test_spec_i_pt_refused(h):
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER, 0, KA, spec_i_pt=True)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
    assert exc.value.field_pointer == 20 and exc.value.bit == 3 and not exc.value.in_cdb
    # SPEC_I_PT=1 with a longer list (TransportIDs following) still gets INVALID FIELD, not LENGTH ERROR.
    params = basic_params(0, KA, spec_i_pt=True) + (28).to_bytes(4, "big") + encode_iscsi_transport_id(B.initiator_port)
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER, params=params)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)


@pytest.mark.parametrize("sa", [0x08, 0x09, 0x1F])
async def test_prout_invalid_service_action(h, sa):
    with pytest.raises(SenseError) as exc:
        await h.out(A, sa, 0, KA)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)


# ------------------------------------------------------------------ PERSISTENT RESERVE IN
@pytest.mark.parametrize("sa", range(4, 0x20))
async def test_prin_invalid_service_actions(h, sa):
    # libiscsi test_prin_serviceaction_range: 0..3 work, 4..0x1f fail.
    with pytest.raises(SenseError) as exc:
        await h.pr.persistent_reserve_in(ScsiCommand(prin_cdb(sa), 0, A))
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)
    assert exc.value.field_pointer == 1


async def test_prin_valid_service_actions_on_empty_lu(h):
    for sa in range(4):
        data = await h.prin(sa)
        assert len(data) == 8
    assert await h.prin(PrInAction.READ_KEYS) == bytes(8)


async def test_read_keys_truncated_keeps_additional_length(h):
    # libiscsi test_prin_read_keys_truncate: ALLOCATION LENGTH 8 -> header only, length unchanged.
    await h.register(A, KA)
    await h.register(B, KB)
    data = await h.prin(PrInAction.READ_KEYS, alloc=8)
    assert len(data) == 8 and struct.unpack(">II", data) == (2, 16)
    data = await h.prin(PrInAction.READ_KEYS, alloc=12)
    assert len(data) == 12


async def test_report_capabilities(h):
    data = await h.prin(PrInAction.REPORT_CAPABILITIES)
    assert len(data) == 8 and struct.unpack_from(">H", data)[0] == 8
    assert data[2] & 0x10  # CRH
    assert not data[2] & 0x08  # SIP_C: SPEC_I_PT not supported
    assert data[2] & 0x04  # ATP_C
    assert data[2] & 0x01  # PTPL_C: a persist callback is wired
    assert data[3] & 0x80  # TMV
    assert (data[3] >> 4) & 0x7 <= 5
    assert not data[3] & 0x01  # PTPL_A off until APTPL=1 is received
    mask = struct.unpack_from(">H", data, 4)[0]
    assert mask == 0xEA01  # all six types, nothing else (libiscsi SCSI_PR_TYPE_MASK_ALL)
    no_persist = PersistentReservations()
    res = await no_persist.persistent_reserve_in(ScsiCommand(prin_cdb(2), 0, A))
    assert not res.data[2] & 0x01


async def test_read_full_status_transport_ids(h):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.reserve(B, KB, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    data = await h.prin(PrInAction.READ_FULL_STATUS)
    gen, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    off, seen = 8, []
    while off < len(data):
        key = int.from_bytes(data[off:off + 8], "big")
        flags, scope_type = data[off + 12], data[off + 13]
        rel = int.from_bytes(data[off + 18:off + 20], "big")
        tid_len = int.from_bytes(data[off + 20:off + 24], "big")
        port, used = parse_iscsi_transport_id(data[off + 24:off + 24 + tid_len])
        assert used == tid_len and tid_len % 4 == 0 and tid_len >= 24
        assert data[off + 24] == 0x45  # FORMAT CODE 01b, protocol iSCSI
        seen.append((key, flags & 1, scope_type, rel, port))
        off += 24 + tid_len
    assert seen == [
        (KA, 0, 0, 1, A.initiator_port),
        (KB, 1, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, 1, B.initiator_port),
    ]


# ------------------------------------------------------------------ RESERVE / RELEASE per type
@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_reserve_and_release_each_type(h, pr_type):
    # libiscsi test_prout_reserve_simple.
    await h.register(A, KA)
    gen_before = (await h.keys())[0]
    await h.reserve(A, KA, pr_type)
    expected_key = 0 if pr_type in AR_TYPES else KA
    assert await h.reservation() == (expected_key, pr_type)
    await h.reserve(A, KA, pr_type)  # again, same type: GOOD, no change
    await h.ok(A, PrOutAction.RELEASE, KA, 0, pr_type)
    assert await h.reservation() is None
    assert (await h.keys())[0] == gen_before  # RESERVE and RELEASE do not bump PRgeneration


@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_reserve_conflicts(h, pr_type):
    await h.register(A, KA)
    await h.register(B, KB)
    # Wrong key, unregistered nexus.
    assert (await h.out(A, PrOutAction.RESERVE, KB, 0, pr_type)).status == Status.RESERVATION_CONFLICT
    assert (await h.out(C, PrOutAction.RESERVE, 0, 0, pr_type)).status == Status.RESERVATION_CONFLICT
    await h.reserve(A, KA, pr_type)
    other = PrType.WRITE_EXCLUSIVE if pr_type != PrType.WRITE_EXCLUSIVE else PrType.EXCLUSIVE_ACCESS
    # The holder asking for another type conflicts.
    assert (await h.out(A, PrOutAction.RESERVE, KA, 0, other)).status == Status.RESERVATION_CONFLICT
    res = await h.out(B, PrOutAction.RESERVE, KB, 0, pr_type)
    if pr_type in AR_TYPES:
        assert res.status == Status.GOOD  # every registrant holds an all-registrants reservation
    else:
        assert res.status == Status.RESERVATION_CONFLICT


async def test_reserve_invalid_type_or_scope(h):
    await h.register(A, KA)
    for bad in (0, 2, 4, 9, 0xF):
        with pytest.raises(SenseError) as exc:
            await h.out(A, PrOutAction.RESERVE, KA, 0, bad)
        expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.RESERVE, KA, 0, 1, scope=1)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_release_rules(h, pr_type):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.register(C, KC)
    await h.reserve(A, KA, pr_type)
    h.uas.clear()
    # Unregistered or wrong key: conflict.
    assert (await h.out(nexus("z"), PrOutAction.RELEASE, 0, 0, pr_type)).status == Status.RESERVATION_CONFLICT
    assert (await h.out(A, PrOutAction.RELEASE, KB, 0, pr_type)).status == Status.RESERVATION_CONFLICT
    if pr_type not in AR_TYPES:
        # A registrant that is not the holder: GOOD, nothing released.
        await h.ok(B, PrOutAction.RELEASE, KB, 0, pr_type)
        assert await h.reservation() is not None
        # Holder with the wrong type: INVALID RELEASE OF PERSISTENT RESERVATION.
        wrong = 1 if pr_type != 1 else 3
        with pytest.raises(SenseError) as exc:
            await h.out(A, PrOutAction.RELEASE, KA, 0, wrong)
        expect_sense(exc, SenseKey.ILLEGAL_REQUEST, (0x26, 0x04))
    releaser = B if pr_type in AR_TYPES else A
    await h.ok(releaser, PrOutAction.RELEASE, KB if releaser is B else KA, 0, pr_type)
    assert await h.reservation() is None
    ua_targets = {t.initiator_port for t, asc, _ in h.uas if asc == sense.RESERVATIONS_RELEASED}
    if pr_type in RO_TYPES | AR_TYPES:
        # SPC-4 §5.13.11.2: RESERVATIONS RELEASED to every other registrant.
        assert ua_targets == {n.initiator_port for n in (A, B, C) if n is not releaser}
    else:
        assert ua_targets == set()


async def test_release_without_reservation_is_good(h):
    await h.register(A, KA)
    await h.ok(A, PrOutAction.RELEASE, KA, 0, PrType.WRITE_EXCLUSIVE)


# ------------------------------------------------------------------ access per type
# libiscsi test_prout_reserve_access_*: (registered read, registered write, unregistered read, unregistered write)
ACCESS = {
    PrType.WRITE_EXCLUSIVE: (True, False, True, False),
    PrType.EXCLUSIVE_ACCESS: (False, False, False, False),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (True, True, False, False),
}


@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_access_holder_registrant_nonregistrant(h, pr_type):
    reg_r, reg_w, unreg_r, unreg_w = ACCESS[pr_type]
    await h.register(A, KA)
    await h.register(B, KB)
    await h.reserve(A, KA, pr_type)
    assert h.can_read(A) and h.can_write(A)
    assert (h.can_read(B), h.can_write(B)) == (reg_r, reg_w)
    await h.ok(B, PrOutAction.REGISTER, KB, 0)  # unregister B
    assert (h.can_read(B), h.can_write(B)) == (unreg_r, unreg_w)
    assert (h.can_read(C), h.can_write(C)) == (unreg_r, unreg_w)
    await h.ok(A, PrOutAction.RELEASE, KA, 0, pr_type)
    assert h.can_read(C) and h.can_write(C)


# SPC-4 Table 63 / SBC-4 §4.18 rows, checked against a Write Exclusive and an Exclusive Access
# reservation held by A, from an unregistered nexus C: (allowed under WE, allowed under EA).
CDB_ROWS = [
    ("TEST UNIT READY", bytes(6), True, True),
    ("INQUIRY", bytes([0x12, 0, 0, 0, 36, 0]), True, True),
    ("REQUEST SENSE", bytes([0x03, 0, 0, 0, 18, 0]), True, True),
    ("REPORT LUNS", bytes([0xA0]) + bytes(11), True, True),
    ("READ CAPACITY(10)", bytes([0x25]) + bytes(9), True, True),
    ("READ CAPACITY(16)", bytes([0x9E, 0x10]) + bytes(14), True, True),
    ("LOG SENSE", bytes([0x4D]) + bytes(9), True, True),
    ("PR IN", prin_cdb(0), True, True),
    ("PR OUT", prout_cdb(0), True, True),
    ("REPORT TARGET PORT GROUPS", bytes([0xA3, 0x0A]) + bytes(10), True, True),
    ("REPORT SUPPORTED OPCODES", bytes([0xA3, 0x0C]) + bytes(10), True, True),
    ("START STOP UNIT start=1", bytes([0x1B, 0, 0, 0, 0x01, 0]), True, True),
    ("START STOP UNIT start=0", bytes([0x1B, 0, 0, 0, 0x00, 0]), False, False),
    ("PREVENT=0", bytes([0x1E, 0, 0, 0, 0, 0]), True, True),
    ("PREVENT=1", bytes([0x1E, 0, 0, 0, 1, 0]), False, False),
    ("READ(6)", bytes([0x08, 0, 0, 1, 1, 0]), True, False),
    ("READ(10)", READ10, True, False),
    ("READ(12)", bytes([0xA8]) + bytes(11), True, False),
    ("READ(16)", bytes([0x88]) + bytes(15), True, False),
    ("READ(32)", bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09]) + bytes(22), True, False),
    ("VERIFY(10)", bytes([0x2F]) + bytes(9), True, False),
    ("VERIFY(16)", bytes([0x8F]) + bytes(15), True, False),
    ("GET LBA STATUS", bytes([0x9E, 0x12]) + bytes(14), True, False),
    ("MODE SENSE(6)", bytes([0x1A, 0, 0x3F, 0, 255, 0]), True, False),
    ("MODE SENSE(10)", bytes([0x5A]) + bytes(9), True, False),
    ("READ BUFFER", bytes([0x3C]) + bytes(9), True, False),
    ("RECEIVE COPY RESULTS", bytes([0x84, 0x03]) + bytes(14), True, False),
    ("WRITE(6)", bytes([0x0A, 0, 0, 1, 1, 0]), False, False),
    ("WRITE(10)", WRITE10, False, False),
    ("WRITE(16)", bytes([0x8A]) + bytes(15), False, False),
    ("WRITE(32)", bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x0B]) + bytes(22), False, False),
    ("WRITE AND VERIFY(10)", bytes([0x2E]) + bytes(9), False, False),
    ("WRITE SAME(10)", bytes([0x41]) + bytes(9), False, False),
    ("WRITE SAME(16)", bytes([0x93]) + bytes(15), False, False),
    ("UNMAP", bytes([0x42]) + bytes(9), False, False),
    ("COMPARE AND WRITE", bytes([0x89]) + bytes(15), False, False),
    ("SYNCHRONIZE CACHE(10)", bytes([0x35]) + bytes(9), False, False),
    ("SYNCHRONIZE CACHE(16)", bytes([0x91]) + bytes(15), False, False),
    ("MODE SELECT(6)", bytes([0x15, 0x10, 0, 0, 0, 0]), False, False),
    ("LOG SELECT", bytes([0x4C]) + bytes(9), False, False),
    ("FORMAT UNIT", bytes([0x04]) + bytes(5), False, False),
    ("SANITIZE", bytes([0x48]) + bytes(9), False, False),
    ("EXTENDED COPY", bytes([0x83]) + bytes(15), False, False),
    ("WRITE BUFFER", bytes([0x3B]) + bytes(9), False, False),
]


@pytest.mark.parametrize("name,cdb,we_ok,ea_ok", CDB_ROWS, ids=[r[0] for r in CDB_ROWS])
async def test_command_table_for_non_holder(name, cdb, we_ok, ea_ok):
    for pr_type, allowed in ((PrType.WRITE_EXCLUSIVE, we_ok), (PrType.EXCLUSIVE_ACCESS, ea_ok),
                             (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, we_ok),
                             (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, ea_ok)):
        h = Harness()
        await h.register(A, KA)
        await h.register(B, KB)
        await h.reserve(A, KA, pr_type)
        assert h.pr.check_conflict(C, cdb) is (not allowed), (name, pr_type.name, "unregistered")
        assert h.pr.check_conflict(A, cdb) is False, (name, pr_type.name, "holder")
        registrant_ok = allowed or pr_type not in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS)
        assert h.pr.check_conflict(B, cdb) is (not registrant_ok), (name, pr_type.name, "registrant")


async def test_no_reservation_never_conflicts(h):
    await h.register(A, KA)
    for _, cdb, _, _ in CDB_ROWS:
        assert not h.pr.check_conflict(C, cdb)


# ------------------------------------------------------------------ ownership (holder unregisters)
@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_holder_unregisters(h, pr_type):
    # libiscsi test_prout_reserve_ownership_*: only all-registrants reservations survive.
    await h.register(A, KA)
    await h.register(B, KB)
    await h.reserve(A, KA, pr_type)
    h.uas.clear()
    await h.ok(A, PrOutAction.REGISTER, KA, 0)
    if pr_type in AR_TYPES:
        assert await h.reservation() == (0, pr_type)
        await h.ok(B, PrOutAction.RELEASE, KB, 0, pr_type)
        assert await h.reservation() is None
    else:
        assert await h.reservation() is None
        released = [t for t, asc, _ in h.uas if asc == sense.RESERVATIONS_RELEASED]
        # SPC-4 §5.13.11.2.2: registrants-only reservations tell the other registrants.
        assert [t.initiator_port for t in released] == ([B.initiator_port] if pr_type in RO_TYPES else [])


async def test_last_registrant_leaving_ends_all_registrants_reservation(h):
    await h.register(A, KA)
    await h.reserve(A, KA, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    await h.ok(A, PrOutAction.REGISTER, KA, 0)
    assert await h.reservation() is None
    assert h.can_write(C)


# ------------------------------------------------------------------ CLEAR
@pytest.mark.parametrize("pr_type", ALL_TYPES)
async def test_clear(h, pr_type):
    # libiscsi test_prout_clear_simple: generation +1 for CLEAR only.
    await h.register(A, KA)
    await h.register(B, KB)
    gen0 = (await h.keys())[0]
    await h.reserve(A, KA, pr_type)
    h.uas.clear()
    assert (await h.out(C, PrOutAction.CLEAR, KC)).status == Status.RESERVATION_CONFLICT
    assert (await h.out(B, PrOutAction.CLEAR, KA)).status == Status.RESERVATION_CONFLICT
    await h.ok(B, PrOutAction.CLEAR, KB)
    assert await h.reservation() is None
    assert await h.keys() == (gen0 + 1, [])
    assert [(t.initiator_port, asc, ex) for t, asc, ex in h.uas] == [
        (A.initiator_port, sense.RESERVATIONS_PREEMPTED, B)]
    assert h.can_write(C)


# ------------------------------------------------------------------ PREEMPT / PREEMPT AND ABORT
async def test_preempt_registration_without_reservation(h):
    # libiscsi test_prout_preempt_rm_reg.
    await h.register(A, KA)
    await h.register(B, KB)
    gen0, _ = await h.keys()
    await h.ok(B, PrOutAction.PREEMPT, KB, KA, PrType.EXCLUSIVE_ACCESS)
    gen, keys = await h.keys()
    assert keys == [KB] and gen == gen0 + 1
    assert [(t.initiator_port, asc) for t, asc, _ in h.uas] == [(A.initiator_port, sense.REGISTRATIONS_PREEMPTED)]
    # A key nobody holds: conflict; key zero without a reservation: conflict.
    assert (await h.out(B, PrOutAction.PREEMPT, KB, 0x999, 1)).status == Status.RESERVATION_CONFLICT
    assert (await h.out(B, PrOutAction.PREEMPT, KB, 0, 1)).status == Status.RESERVATION_CONFLICT
    # Unregistered or wrong own key.
    assert (await h.out(C, PrOutAction.PREEMPT, 0, KB, 1)).status == Status.RESERVATION_CONFLICT


@pytest.mark.parametrize("pr_type", [t for t in ALL_TYPES if t not in AR_TYPES])
@pytest.mark.parametrize("abort", [False, True])
async def test_preempt_holder(h, pr_type, abort):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.register(C, KC)
    await h.reserve(A, KA, pr_type)
    gen0 = (await h.keys())[0]
    h.uas.clear()
    new_type = PrType.EXCLUSIVE_ACCESS
    sa = PrOutAction.PREEMPT_AND_ABORT if abort else PrOutAction.PREEMPT
    res = await h.ok(B, sa, KB, KA, new_type)
    assert await h.reservation() == (KB, new_type)
    gen, keys = await h.keys()
    assert keys == [KB, KC] and gen == gen0 + 1
    uas = {(t.initiator_port, asc) for t, asc, _ in h.uas}
    assert (A.initiator_port, sense.REGISTRATIONS_PREEMPTED) in uas
    if new_type != pr_type:
        assert (C.initiator_port, sense.RESERVATIONS_RELEASED) in uas
    else:
        assert (C.initiator_port, sense.RESERVATIONS_RELEASED) not in uas
    assert (B.initiator_port, sense.REGISTRATIONS_PREEMPTED) not in uas
    if abort:
        assert res.extra["abort_nexuses"] == [A]
    else:
        assert not res.extra  # nothing to abort
    assert not h.can_read(A) and h.can_write(B)


async def test_preempt_non_holder_key_keeps_reservation(h):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.register(C, KC)
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    await h.ok(B, PrOutAction.PREEMPT, KB, KC, PrType.WRITE_EXCLUSIVE)
    assert await h.reservation() == (KA, PrType.WRITE_EXCLUSIVE)
    assert (await h.keys())[1] == [KA, KB]
    # Key zero with a non-all-registrants reservation: INVALID FIELD IN PARAMETER LIST.
    with pytest.raises(SenseError) as exc:
        await h.out(B, PrOutAction.PREEMPT, KB, 0, PrType.WRITE_EXCLUSIVE)
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)


@pytest.mark.parametrize("pr_type", sorted(AR_TYPES))
async def test_preempt_all_registrants(h, pr_type):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.register(C, KC)
    await h.reserve(A, KA, pr_type)
    # Non-zero key: only that registration goes, reservation stays.
    await h.ok(B, PrOutAction.PREEMPT, KB, KC, pr_type)
    assert await h.reservation() == (0, pr_type)
    assert (await h.keys())[1] == [KA, KB]
    # Zero key: everybody else goes, B holds a new reservation of the given type.
    h.uas.clear()
    res = await h.ok(B, PrOutAction.PREEMPT_AND_ABORT, KB, 0, PrType.WRITE_EXCLUSIVE)
    assert await h.reservation() == (KB, PrType.WRITE_EXCLUSIVE)
    assert (await h.keys())[1] == [KB]
    assert res.extra["abort_nexuses"] == [A]
    assert (A.initiator_port, sense.REGISTRATIONS_PREEMPTED) in {(t.initiator_port, a) for t, a, _ in h.uas}


async def test_holder_preempts_itself_to_change_type(h):
    await h.register(A, KA)
    await h.register(B, KB)
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    h.uas.clear()
    await h.ok(A, PrOutAction.PREEMPT, KA, KA, PrType.EXCLUSIVE_ACCESS)
    assert await h.reservation() == (KA, PrType.EXCLUSIVE_ACCESS)
    assert (await h.keys())[1] == [KA, KB]
    assert [(t.initiator_port, a) for t, a, _ in h.uas] == [(B.initiator_port, sense.RESERVATIONS_RELEASED)]


# ------------------------------------------------------------------ REGISTER AND MOVE
def move_params(key, sa_key, rel_port, port_name, *, unreg=False, aptpl=False) -> bytes:
    tid = encode_iscsi_transport_id(port_name)
    flags = (0x02 if unreg else 0) | (0x01 if aptpl else 0)
    return struct.pack(">QQxBHI", key, sa_key, flags, rel_port, len(tid)) + tid


@pytest.mark.parametrize("pr_type", ALL_TYPES)
@pytest.mark.parametrize("unreg", [False, True])
async def test_register_and_move(h, pr_type, unreg):
    await h.register(A, KA)
    await h.reserve(A, KA, pr_type)
    gen0 = (await h.keys())[0]
    params = move_params(KA, KC, 1, C.initiator_port, unreg=unreg)
    res = await h.out(A, PrOutAction.REGISTER_AND_MOVE, params=params, pr_type=pr_type)
    if pr_type in AR_TYPES:
        assert res.status == Status.RESERVATION_CONFLICT
        return
    assert res.status == Status.GOOD
    assert await h.reservation() == (KC, pr_type)
    gen, keys = await h.keys()
    assert gen == gen0 + 1
    assert keys == ([KC] if unreg else [KA, KC])
    assert h.pr.is_holder(C) and not h.pr.is_holder(A)


async def test_register_and_move_errors(h):
    await h.register(A, KA)
    await h.register(B, KB)
    # No reservation: conflict.
    res = await h.out(A, PrOutAction.REGISTER_AND_MOVE, params=move_params(KA, KC, 1, C.initiator_port))
    assert res.status == Status.RESERVATION_CONFLICT
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    # Not the holder.
    res = await h.out(B, PrOutAction.REGISTER_AND_MOVE, params=move_params(KB, KC, 1, C.initiator_port))
    assert res.status == Status.RESERVATION_CONFLICT
    # Zero SA key, to itself, unknown relative port, not iSCSI, truncated list.
    for params, ptr in ((move_params(KA, 0, 1, C.initiator_port), 8),
                        (move_params(KA, KC, 1, A.initiator_port), 24),
                        (move_params(KA, KC, 7, C.initiator_port), 18)):
        with pytest.raises(SenseError) as exc:
            await h.out(A, PrOutAction.REGISTER_AND_MOVE, params=params)
        expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
        assert exc.value.field_pointer == ptr
    fc = bytearray(move_params(KA, KC, 1, C.initiator_port))
    fc[24] = 0x40  # protocol 0 (Fibre Channel)
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER_AND_MOVE, params=bytes(fc))
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)
    with pytest.raises(SenseError) as exc:
        await h.out(A, PrOutAction.REGISTER_AND_MOVE, params=move_params(KA, KC, 1, C.initiator_port)[:30])
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.PARAMETER_LIST_LENGTH_ERROR)
    assert await h.reservation() == (KA, PrType.WRITE_EXCLUSIVE)


async def test_register_and_move_to_other_target_port_and_bare_name():
    h = Harness(target_ports=lambda: {1: PORT1, 2: PORT2})
    await h.register(A, KA)
    await h.reserve(A, KA, PrType.EXCLUSIVE_ACCESS)
    bare = "iqn.1994-05.com.example:c"  # TransportID format 00b: every ISID of that name
    await h.ok(A, PrOutAction.REGISTER_AND_MOVE, params=move_params(KA, KC, 2, bare))
    c_on_port2 = nexus("c", isid="400001370000", port=PORT2, rel=2)
    assert h.pr.is_holder(c_on_port2)
    assert h.can_write(c_on_port2) and not h.can_read(nexus("c", port=PORT1, rel=1))


def test_transport_id_round_trip_and_padding():
    for port in (A.initiator_port, "iqn.x", "iqn.2001-04.com.example:" + "n" * 150):
        tid = encode_iscsi_transport_id(port)
        assert len(tid) % 4 == 0 and len(tid) >= 24
        assert parse_iscsi_transport_id(tid) == (port, len(tid))
    assert encode_iscsi_transport_id("iqn.x")[0] == 0x05  # format 00b
    upper = encode_iscsi_transport_id(A.initiator_port.upper().replace(",I,0X", ",i,0x"))
    assert parse_iscsi_transport_id(upper)[0] == A.initiator_port
    bad_isid = bytearray(encode_iscsi_transport_id("iqn.x,i,0x12"))
    bad_isid[0] = 0x45
    with pytest.raises(SenseError):
        parse_iscsi_transport_id(bytes(bad_isid))


# ------------------------------------------------------------------ APTPL
async def test_aptpl_persist_and_restore():
    h = Harness()
    await h.register(A, KA, aptpl=True)
    await h.register(B, KB, aptpl=True)
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert h.saved, "APTPL=1 must save the state"
    last = json.loads(json.dumps(h.saved[-1]))  # JSON-serialisable
    assert last["aptpl"] is True and last["reservation"]["type"] == PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
    caps = await h.prin(PrInAction.REPORT_CAPABILITIES)
    assert caps[3] & 0x01  # PTPL_A
    # "Restart": a new object from the saved state behaves the same.
    h2 = Harness(state=last)
    # The keys come back; PRgeneration starts again at zero (a restart is a power on).
    assert await h2.keys() == (0, (await h.keys())[1]) and (await h.keys())[0] > 0
    assert await h2.reservation() == (KA, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert h2.can_write(B) and not h2.can_write(C) and h2.pr.is_holder(A)
    assert h2.pr.aptpl


async def test_aptpl_off_is_saved_and_restores_nothing():
    h = Harness()
    await h.register(A, KA, aptpl=True)
    n = len(h.saved)
    await h.register(B, KB)  # APTPL=0: the last value received wins (SPC-4 §5.13.5)
    assert len(h.saved) == n + 1 and h.saved[-1]["aptpl"] is False
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    assert len(h.saved) == n + 1  # APTPL off: nothing more is saved
    h2 = Harness(state=h.saved[-1])
    assert await h2.keys() == (0, [])


async def test_aptpl_without_persist_callback_is_refused():
    pr = PersistentReservations()
    data = basic_params(0, KA, aptpl=True)
    with pytest.raises(SenseError) as exc:
        await pr.persistent_reserve_out(ScsiCommand(prout_cdb(6), 0, A, data_out=data))
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_PARAMETER_LIST)


@pytest.mark.parametrize("bad", [
    {"version": 99, "aptpl": True},
    {"version": 1, "aptpl": True, "registrations": [], "reservation": {"type": 1, "holder": 0}},
    {"version": 1, "aptpl": True, "registrations": [
        {"initiator_port": "x", "target_port": None, "relative_port_id": 1, "key": 0}]},
    {"version": 1, "aptpl": True, "registrations": [
        {"initiator_port": "x", "target_port": None, "relative_port_id": 1, "key": 5}],
     "reservation": {"type": 2, "holder": 0}},
])
def test_restore_rejects_inconsistent_state(bad):
    with pytest.raises(ValueError):
        PersistentReservations(state=bad)


# ------------------------------------------------------------------ SPC-2 RESERVE / RELEASE
RESERVE6 = bytes([0x16, 0, 0, 0, 0, 0])
RELEASE6 = bytes([0x17, 0, 0, 0, 0, 0])
RESERVE10 = bytes([0x56]) + bytes(9)
RELEASE10 = bytes([0x57]) + bytes(9)
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 255, 0])


async def scsi2(pr, nx, cdb):
    fn = pr.reserve if cdb[0] in (0x16, 0x56) else pr.release
    return (await fn(ScsiCommand(cdb, 0, nx))).status


@pytest.mark.parametrize("reserve,release", [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
async def test_reserve6_two_initiators(reserve, release):
    # libiscsi test_reserve6_2initiators.
    pr = PersistentReservations()
    assert await scsi2(pr, A, reserve) == Status.GOOD
    assert await scsi2(pr, A, reserve) == Status.GOOD
    assert await scsi2(pr, B, reserve) == Status.RESERVATION_CONFLICT
    assert await scsi2(pr, B, release) == Status.GOOD  # non-holder: GOOD, no effect
    assert not pr.check_conflict(A, MODE_SENSE6)
    assert pr.check_conflict(B, MODE_SENSE6)
    assert await scsi2(pr, B, reserve) == Status.RESERVATION_CONFLICT
    assert await scsi2(pr, A, release) == Status.GOOD
    assert await scsi2(pr, B, reserve) == Status.GOOD
    assert await scsi2(pr, B, release) == Status.GOOD
    assert pr.scsi2_holder is None


async def test_reserve6_blocks_others_except_spc2_list():
    pr = PersistentReservations()
    await scsi2(pr, A, RESERVE6)
    for cdb in (READ10, WRITE10, bytes(6), MODE_SENSE6):
        assert pr.check_conflict(B, cdb) and not pr.check_conflict(A, cdb)
    # SPC-2 §5.5.1: persistent reservation commands conflict for the holder too.
    for cdb in (prin_cdb(0), prin_cdb(2), prout_cdb(0), prout_cdb(6)):
        assert pr.check_conflict(B, cdb) and pr.check_conflict(A, cdb)
    for cdb in (bytes([0x12, 0, 0, 0, 36, 0]), bytes([0xA0]) + bytes(11), bytes([0x03, 0, 0, 0, 18, 0]),
                RELEASE6, RELEASE10, bytes([0xA3, 0x0A]) + bytes(10)):
        assert not pr.check_conflict(B, cdb)
    # The same initiator through another target port is another I_T nexus.
    assert pr.check_conflict(nexus("a", port=PORT2, rel=2), READ10)


@pytest.mark.parametrize("event", ["nexus_lost", "lun_reset"])
async def test_reserve6_ends_on_nexus_loss_and_lun_reset(event):
    pr = PersistentReservations()
    await scsi2(pr, A, RESERVE6)
    if event == "nexus_lost":
        pr.nexus_lost(B)  # someone else's loss changes nothing
        assert pr.scsi2_holder is not None
        pr.nexus_lost(A)
    else:
        pr.lun_reset()
    assert await scsi2(pr, B, RESERVE6) == Status.GOOD


async def test_lun_reset_and_nexus_loss_keep_persistent_reservations(h):
    await h.register(A, KA)
    await h.reserve(A, KA, PrType.EXCLUSIVE_ACCESS)
    h.pr.lun_reset()
    h.pr.nexus_lost(A)
    assert await h.reservation() == (KA, PrType.EXCLUSIVE_ACCESS)


async def test_reserve6_third_party_refused():
    pr = PersistentReservations()
    with pytest.raises(SenseError) as exc:
        await pr.reserve(ScsiCommand(bytes([0x56, 0x10]) + bytes(8), 0, A))
    expect_sense(exc, SenseKey.ILLEGAL_REQUEST, sense.INVALID_FIELD_IN_CDB)
    with pytest.raises(SenseError):
        await pr.reserve(ScsiCommand(bytes([0x16, 0x01, 0, 0, 0, 0]), 0, A))


async def test_reserve6_with_persistent_reservations_crh(h):
    """SPC-4 §5.13.3 with CRH=1."""
    await h.register(A, KA)
    await h.register(B, KB)
    # Registrations but no reservation: RESERVE conflicts for everybody.
    assert await scsi2(h.pr, A, RESERVE6) == Status.RESERVATION_CONFLICT
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE)
    assert await scsi2(h.pr, A, RESERVE6) == Status.GOOD  # holder: GOOD, no effect
    assert h.pr.scsi2_holder is None
    assert await scsi2(h.pr, B, RESERVE6) == Status.RESERVATION_CONFLICT
    assert await scsi2(h.pr, A, RELEASE6) == Status.GOOD
    assert await h.reservation() == (KA, PrType.WRITE_EXCLUSIVE)  # RELEASE(6) leaves the PR alone
    assert await scsi2(h.pr, C, RELEASE6) == Status.RESERVATION_CONFLICT
    await h.ok(A, PrOutAction.RELEASE, KA, 0, PrType.WRITE_EXCLUSIVE)
    await h.reserve(A, KA, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert await scsi2(h.pr, B, RESERVE6) == Status.GOOD  # registrant under registrants-only


async def test_persistent_reserve_out_conflicts_under_reserve6():
    pr = PersistentReservations()
    await scsi2(pr, A, RESERVE6)
    # SPC-2 §5.5.1: "regardless of initiator or service action" — the holder too.
    assert pr.check_conflict(B, prout_cdb(PrOutAction.REGISTER))
    assert pr.check_conflict(A, prout_cdb(PrOutAction.REGISTER))


def test_state_is_json_and_reports_reserve6_holder():
    pr = PersistentReservations()
    st = pr.state()
    assert json.loads(json.dumps(st)) == st
    assert st["registrations"] == [] and st["reservation"] is None and st["scsi2_holder"] is None


def test_nexus_matches_patterns():
    a2 = nexus("a", port=PORT2, rel=2)
    a_isid2 = nexus("a", isid="400001370000")
    tpg2 = ITNexus(A.initiator_port, A.target_port, 1, 2)
    assert nexus_matches(A, A) and nexus_matches(A, tpg2)
    assert not nexus_matches(A, a2) and not nexus_matches(A, a_isid2) and not nexus_matches(A, B)
    every_port = ITNexus(A.initiator_port, "")
    assert nexus_matches(every_port, a2) and not nexus_matches(every_port, a_isid2)
    every_isid = ITNexus("iqn.1994-05.com.example:a", PORT1)
    assert nexus_matches(every_isid, a_isid2) and not nexus_matches(every_isid, a2)


async def test_ua_targets_of_all_tg_pt_registration_reach_every_port(h):
    await h.register(A, KA, all_tg_pt=True)
    await h.register(B, KB)
    await h.ok(B, PrOutAction.CLEAR, KB)
    (target, asc, except_nexus), = h.uas
    assert asc == sense.RESERVATIONS_PREEMPTED and except_nexus == B
    assert nexus_matches(target, A) and nexus_matches(target, nexus("a", port=PORT2, rel=2))
    assert not nexus_matches(target, B)

"""Mode pages: current / changeable / default / saved values, MODE SENSE and MODE SELECT (SPC-4 §7.5, SBC-4 §6.5).

Pages kept (all page_0 format, no subpages):
  01h Read-Write Error Recovery  - fixed, answers initiators that read it
  08h Caching                     - WCE changeable (write-back cache on by default)
  0Ah Control                     - D_SENSE and SWP changeable
  1Ch Informational Exceptions    - fixed, exceptions disabled (DEXCPT=1)

SPC-4 §6.9: MODE SELECT with SP=1 saves *every* saveable page (not only the ones sent) to a
nonvolatile location.  "Saved" values live in memory unless a ``persist`` callback is given:
it receives :meth:`ModePages.export_saved` before the new values take effect (a failure
leaves everything unchanged), and :meth:`ModePages.import_saved` restores what it stored.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from . import sense as S
from .sense import SenseError, SenseKey

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3
ALL_PAGES = 0x3F
ALL_SUBPAGES = 0xFF

#: Version of the dictionary :meth:`ModePages.export_saved` returns.
SAVED_STATE_VERSION = 1

PAGE_RW_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C

# MODE SENSE(6) header, MODE SENSE(10) header, block descriptors (SPC-4 §7.5.5, SBC-4 §6.5.2)
HDR6 = struct.Struct(">BBBB")
HDR10 = struct.Struct(">HBBBxH")
SHORT_BD = struct.Struct(">IxBH")  # number of blocks, block length as 3 bytes (1 + 2)
LONG_BD = struct.Struct(">Q4xI")

DEVSPEC_WP = 0x80  # device-specific parameter: write protected (SBC-4 §6.5.2)
DEVSPEC_DPOFUA = 0x10  # DPO and FUA bits supported


@dataclass(frozen=True)
class PageDef:
    code: int
    default: bytes  # the whole page, header included
    changeable: bytes  # same length; 1 bits may be changed by MODE SELECT


def _page(code: int, body: bytes) -> bytes:
    return bytes((code, len(body))) + body


def _mask(length: int, bits: dict[int, int]) -> bytes:
    m = bytearray(length)
    for off, val in bits.items():
        m[off] = val
    return bytes(m)


def default_pages() -> list[PageDef]:
    rw = _page(PAGE_RW_ERROR_RECOVERY, bytes(10))
    # Caching (SBC-4 §6.5.5): byte 2 bit 2 WCE.  The image file sits behind the page
    # cache, which is a volatile write cache: WCE=1 tells the initiator to send
    # SYNCHRONIZE CACHE / FUA when it needs durability.
    caching = bytearray(_page(PAGE_CACHING, bytes(18)))
    caching[2] = 0x04
    # Control (SPC-4 §7.5.8): QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering),
    # BUSY TIMEOUT PERIOD FFFFh (unlimited).
    control = bytearray(_page(PAGE_CONTROL, bytes(10)))
    control[3] = 0x10
    control[8:10] = b"\xff\xff"
    # Informational Exceptions Control (SPC-4 §7.5.13): DEXCPT=1, no reporting.
    iec = bytearray(_page(PAGE_INFORMATIONAL_EXCEPTIONS, bytes(10)))
    iec[2] = 0x08
    return [
        PageDef(PAGE_RW_ERROR_RECOVERY, rw, bytes(len(rw))),
        PageDef(PAGE_CACHING, bytes(caching), _mask(len(caching), {2: 0x04})),
        PageDef(PAGE_CONTROL, bytes(control), _mask(len(control), {2: 0x04, 4: 0x08})),
        PageDef(PAGE_INFORMATIONAL_EXCEPTIONS, bytes(iec), bytes(len(iec))),
    ]


def _first_bit(x: int) -> int:
    return x.bit_length() - 1


class ModePages:
    """Mode parameter state of one logical unit (shared by all I_T nexuses)."""

    def __init__(self, pages: list[PageDef] | None = None, *,
                 persist: Callable[[dict], None] | None = None) -> None:
        self._persist = persist
        self._defs = {p.code: p for p in (pages or default_pages())}
        self._order = sorted(self._defs)
        self._current = {c: bytearray(p.default) for c, p in self._defs.items()}
        self._saved = {c: bytearray(p.default) for c, p in self._defs.items()}
        self._refresh()

    # -- hot-path accessors (cached on every change) -------------------------------
    def _refresh(self) -> None:
        ctl = self._current.get(PAGE_CONTROL)
        cache = self._current.get(PAGE_CACHING)
        self.d_sense = bool(ctl and ctl[2] & 0x04)
        self.swp = bool(ctl and ctl[4] & 0x08)
        self.wce = bool(cache and cache[2] & 0x04)

    # -- state -----------------------------------------------------------------------
    def reset_to_saved(self) -> None:
        """SPC-4 §7.5.2: after power on, hard reset and logical unit reset, current := saved."""
        for c, v in self._saved.items():
            self._current[c][:] = v
        self._refresh()

    def saved_state(self) -> dict[int, bytes]:
        return {c: bytes(v) for c, v in self._saved.items()}

    def export_saved(self, saved: dict[int, bytes | bytearray] | None = None) -> dict:
        """JSON-serialisable saved values, what a ``persist`` callback stores."""
        saved = self._saved if saved is None else saved
        return {"version": SAVED_STATE_VERSION,
                "pages": {f"{c:02x}": bytes(v).hex() for c, v in sorted(saved.items())}}

    def import_saved(self, state: dict) -> None:
        """Restore :meth:`export_saved` output (then current := saved).  Raises ValueError on
        anything that does not fit these pages: a loud start beats silently lost settings."""
        if state.get("version") != SAVED_STATE_VERSION:
            raise ValueError(f"unsupported mode page state version {state.get('version')!r}")
        loaded = {}
        for key, value in dict(state.get("pages", {})).items():
            code, raw = int(key, 16), bytes.fromhex(value)
            d = self._defs.get(code)
            if d is None or len(raw) != len(d.default) or raw[0] & 0x3F != code:
                raise ValueError(f"saved mode page {key} does not match this logical unit")
            bad = [i for i in range(2, len(raw)) if (raw[i] ^ d.default[i]) & ~d.changeable[i] & 0xFF]
            if bad:
                raise ValueError(f"saved mode page {key} changes a fixed field (byte {bad[0]})")
            loaded[code] = raw
        for code, raw in loaded.items():
            self._saved[code][:] = raw
        self.reset_to_saved()

    def page(self, code: int, pc: int = PC_CURRENT) -> bytes:
        d = self._defs[code]
        if pc == PC_CURRENT:
            return bytes(self._current[code])
        if pc == PC_CHANGEABLE:
            return d.changeable[:1] + bytes((len(d.default) - 2,)) + d.changeable[2:]
        if pc == PC_DEFAULT:
            return d.default
        return bytes(self._saved[code])

    # -- MODE SENSE ------------------------------------------------------------------
    def sense(
        self,
        *,
        ten: bool,
        cdb: bytes,
        num_blocks: int,
        block_size: int,
        write_protected: bool,
    ) -> bytes:
        """Build MODE SENSE(6)/(10) parameter data (SPC-4 §6.11, §6.12), not yet cut to the allocation length."""
        dbd = cdb[1] & 0x08
        llbaa = ten and bool(cdb[1] & 0x10)
        pc = cdb[2] >> 6
        code = cdb[2] & 0x3F
        subpage = cdb[3]
        if code == ALL_PAGES:
            if subpage not in (0x00, ALL_SUBPAGES):
                raise S.illegal_field(3)
            codes = self._order
        else:
            if code not in self._defs or subpage not in (0x00, ALL_SUBPAGES):
                raise S.illegal_field(2 if code not in self._defs else 3, 5 if code not in self._defs else None)
            codes = [code]
        body = bytearray()
        for c in codes:
            p = bytearray(self.page(c, pc))
            p[0] = c | 0x80  # PS: the page can be saved
            body += p
        if dbd:
            bd = b""
        elif llbaa:
            bd = LONG_BD.pack(num_blocks, block_size)
        else:
            bd = SHORT_BD.pack(min(num_blocks, 0xFFFFFFFF), block_size >> 16, block_size & 0xFFFF)
        if pc == PC_CHANGEABLE and bd:
            bd = bytes(len(bd))  # neither capacity nor block length can be changed
        devspec = DEVSPEC_DPOFUA | (DEVSPEC_WP if write_protected else 0)
        if ten:
            total = 8 + len(bd) + len(body)
            hdr = HDR10.pack(total - 2, 0, devspec, 0x01 if llbaa and bd else 0, len(bd))
        else:
            total = 4 + len(bd) + len(body)
            if total - 1 > 0xFF:
                raise SenseError(SenseKey.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB, field_pointer=2)
            hdr = HDR6.pack(total - 1, 0, devspec, len(bd))
        return hdr + bd + bytes(body)

    # -- MODE SELECT -----------------------------------------------------------------
    def select(self, *, ten: bool, cdb: bytes, params: bytes, block_size: int, num_blocks: int) -> bool:
        """Apply a MODE SELECT(6)/(10) parameter list (SPC-4 §6.9, §6.10); return True if anything changed.

        The whole list is checked before any of it is applied, so a bad page changes nothing.
        """
        pf = cdb[1] & 0x10
        sp = cdb[1] & 0x01
        if not params:
            if sp:
                self._save({c: bytes(v) for c, v in self._current.items()})
            return False
        if not pf:
            # Only the page format is implemented (SPC-4 §6.9: PF=0 means vendor specific pages).
            raise S.illegal_field(1, 4)
        hdr_len = 8 if ten else 4
        if len(params) < hdr_len:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        if ten:
            longlba = params[4] & 0x01
            bd_len = (params[6] << 8) | params[7]
            bd_ptr = 6
        else:
            longlba = 0
            bd_len = params[3]
            bd_ptr = 3
        bd_size = 16 if longlba else 8
        if bd_len not in (0, bd_size):
            raise S.illegal_param(bd_ptr)
        if hdr_len + bd_len > len(params):
            raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
        if bd_len:
            if longlba:
                nblocks, blen = LONG_BD.unpack_from(params, hdr_len)
                blen_off = hdr_len + 12
            else:
                nblocks, hi, lo = SHORT_BD.unpack_from(params, hdr_len)
                blen = (hi << 16) | lo
                blen_off = hdr_len + 5
                if nblocks == 0xFFFFFFFF and num_blocks > 0xFFFFFFFF:
                    nblocks = num_blocks
            if nblocks not in (0, num_blocks):
                raise S.illegal_param(hdr_len)
            if blen != block_size:
                raise S.illegal_param(blen_off)
        pos = hdr_len + bd_len
        updates: list[tuple[int, bytes]] = []
        while pos < len(params):
            if pos + 2 > len(params):
                raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
            b0 = params[pos]
            code = b0 & 0x3F
            if b0 & 0x40:  # SPF: sub-page format; no sub-pages are implemented
                raise S.illegal_param(pos, 6)
            d = self._defs.get(code)
            if d is None:
                raise S.illegal_param(pos, 5)
            plen = params[pos + 1]
            if plen != len(d.default) - 2:
                raise S.illegal_param(pos + 1)
            end = pos + 2 + plen
            if end > len(params):
                raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
            cur = self._current[code]
            new = params[pos:end]
            for i in range(2, len(new)):
                bad = (new[i] ^ cur[i]) & ~d.changeable[i] & 0xFF
                if bad:
                    raise S.illegal_param(pos + i, _first_bit(bad))
            updates.append((code, bytes(new)))
            pos = end
        if sp:
            # SP=1 saves every saveable page as it is once this command has been applied.
            after = {c: bytes(v) for c, v in self._current.items()}
            for code, new in updates:
                after[code] = after[code][:2] + new[2:]
            self._save(after)
        changed = False
        for code, new in updates:
            cur = self._current[code]
            if cur[2:] != new[2:]:
                cur[2:] = new[2:]
                changed = True
        self._refresh()
        return changed

    def _save(self, pages: dict[int, bytes]) -> None:
        """Make ``pages`` the saved values: stored by ``persist`` first, so a failure changes nothing."""
        if self._persist is not None:
            self._persist(self.export_saved(pages))
        for code, raw in pages.items():
            self._saved[code][:] = raw

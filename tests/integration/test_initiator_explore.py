"""The initiator CLI and library as a new user meets them, against our target and tgtd: a
benchmark of writes large enough for R2Ts, ``readcap``/``ls`` of LUNs that are not there or are
not disks (tgtd's LUN 0 is its controller, and it refuses REPORT LUNS at a missing LUN).

Each case must give one ``error:`` line naming the cause and a non-zero status, or the right
answer; the CLI runs in-process (click's CliRunner) so the file stays fast.
"""
from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from iscsi.initiator import bench as bench_mod
from iscsi.initiator import cli as CLI
from iscsi.initiator.client import open_device
from tools.peers import make_peer

INITIATOR = "iqn.2026-11.org.sanstack:explore"
MiB = 1 << 20


@pytest.fixture(scope="module", params=["sanstack", "tgt"])
def target(request, tmp_path_factory):
    """One started target of each kind, two 16 MiB LUNs."""
    if request.param == "tgt":
        from tools.peers.tgt import available

        if available():
            pytest.skip(available())
    peer = make_peer(request.param, tmp_path_factory.mktemp(f"explore-{request.param}"), size="16M", luns=2)
    peer.start()
    yield peer
    peer.stop()


def run_cli(*args: str):
    r = CliRunner().invoke(CLI.main, ["-i", INITIATOR, *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error line: {r.exception!r}\n{r.output}")
    return r


def lun_url(peer, lun: int) -> str:
    return peer.url(0).rsplit("/", 1)[0] + f"/{lun}"


def test_bench_writes_that_need_r2ts_reuse_their_slots(target):
    """A 1 MiB write is more than either target's FirstBurstLength, so R2Ts ask for the rest.
    A slot's second write used to expect R2TSN 1 (its first write's count was not reset): the
    initiator dropped the connection as a protocol violation and the run ended in an error."""
    async def go():
        session, dev = await open_device(target.url(0), initiator_name=INITIATOR)
        try:
            return await bench_mod.run(session, dev.lun, block_size=dev.block_size, blocks=dev.blocks,
                                       bs=MiB, qd=2, duration=30, pattern="random", read_pct=0,
                                       max_ios=12, seed=1)
        finally:
            await session.close()

    r = asyncio.run(go())
    assert (r.errors, r.first_error, r.ios, r.writes) == (0, None, 12, 12)


def test_bench_cli_mixed_large_blocks(target):
    r = run_cli("bench", target.url(0), "--rw", "randrw", "--bs", "256k", "--qd", "4", "-t", "0.5")
    assert r.exit_code == 0, r.output
    assert " 0 errors" in r.output


def test_readcap_of_a_missing_lun_names_it(target):
    # was "READ CAPACITY 10 (opcode 0x25): CHECK_CONDITION (ILLEGAL_REQUEST ...)"
    r = run_cli("readcap", lun_url(target, 9))
    assert r.exit_code == 1, r.output
    assert "LUN 9 does not exist" in r.output and "READ CAPACITY" not in r.output


def test_readcap_still_reports_the_capacity(target):
    r = run_cli("readcap", target.url(0))
    assert r.exit_code == 0, r.output
    assert "Blocks: 32768" in r.output and "Block size: 512" in r.output


@pytest.mark.parametrize("target", ["tgt"], indirect=True)  # only tgtd has a controller LUN (type 0Ch)
def test_readcap_of_tgtd_controller_lun(target):
    r = run_cli("readcap", lun_url(target, 0))
    assert r.exit_code == 1, r.output
    assert "LUN 0 is not a block device" in r.output, r.output


def test_ls_through_a_missing_lun_lists_the_real_ones(target):
    # tgtd refuses REPORT LUNS at a LUN that is not there: ls used to show one phantom row
    # "Lun:9 Type:31" instead of the target's LUNs
    r = run_cli("ls", lun_url(target, 9))
    assert r.exit_code == 0, r.output
    assert "Lun:9" not in r.output
    for lun in target.lun_ids:
        assert f"Lun:{lun} " in r.output, r.output

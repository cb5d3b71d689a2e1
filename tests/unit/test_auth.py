"""CHAP (RFC 1994, RFC 7143 §12.1.3), target and initiator sides."""

from __future__ import annotations

import base64
import hashlib
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from iscsi.auth import (
    CHAP_SECRET_MAX_LEN, CHAP_SECRET_MIN_LEN, AuthState, ChapCredentials, ChapInitiatorAuth,
    ChapTargetAuth, chap_response,
)
from iscsi.keys import LoginStatus

INITIATOR_SECRET = b"initiator-secret-16"
TARGET_SECRET = b"target-secret-0016"
USERS = {"iqn.2004-10.com.ubuntu:01:guest": INITIATOR_SECRET}
TARGET_CREDS = ChapCredentials("iqn.2026-11.org.example:t1", TARGET_SECRET)


def counting_random():
    """Deterministic stand-in for secrets.token_bytes: 0x00, 0x01, ... wrapping."""
    counter = itertools.count()
    return lambda n: bytes(next(counter) & 0xFF for _ in range(n))


def md5_response(identifier: int, secret: bytes, challenge: bytes) -> str:
    """What open-iscsi computes, written out independently of iscsi.auth."""
    return "0x" + hashlib.md5(bytes([identifier]) + secret + challenge).hexdigest()


def chap_target(**kw) -> ChapTargetAuth:
    kw.setdefault("random_bytes", counting_random())
    return ChapTargetAuth(USERS.get, **kw)


def start_chap(auth: ChapTargetAuth, algorithms: str = "5") -> dict[str, str]:
    step = auth.step([("AuthMethod", "CHAP,None")])
    assert step.keys == [("AuthMethod", "CHAP")] and step.state is AuthState.CONTINUE
    step = auth.step([("CHAP_A", algorithms)])
    assert step.state is AuthState.CONTINUE
    return dict(step.keys)


# ----------------------------------------------------------------------------- vectors


def test_known_vectors_computed_with_openssl():
    # printf '\x2aabcdefghijkl1234\x00\x01...\x0f' | openssl dgst -md5 / -sha256
    challenge = bytes(range(16))
    assert chap_response(5, 0x2A, b"abcdefghijkl1234", challenge).hex() == \
        "caec716ea01cfab6bc3373d0d35d83b6"
    assert chap_response(7, 0x2A, b"abcdefghijkl1234", challenge).hex() == \
        "812a8daae5cd4c05f525059ec3971a92b52abc74c343242512141d54d92fdb70"


@pytest.mark.parametrize("alg,name", [(5, "md5"), (6, "sha1"), (7, "sha256"), (8, "sha3_256")])
def test_response_is_hash_of_id_secret_challenge(alg, name):
    expected = hashlib.new(name, b"\x07" + b"s" * 12 + b"chal").digest()
    assert chap_response(alg, 7, b"s" * 12, b"chal") == expected


# ----------------------------------------------------------------------------- target


class TestTargetOneWay:
    def test_open_iscsi_md5_exchange(self):
        auth = chap_target()
        sent = start_chap(auth)
        # random source yields 0x00 for CHAP_I, then 0x01..0x10 for the challenge
        assert sent == {"CHAP_A": "5", "CHAP_I": "0",
                        "CHAP_C": "0x" + bytes(range(1, 17)).hex()}
        response = md5_response(0, INITIATOR_SECRET, bytes(range(1, 17)))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", response)])
        assert (step.state, step.keys, step.transit) == (AuthState.SUCCESS, [], True)
        assert auth.peer_name == "iqn.2004-10.com.ubuntu:01:guest" and auth.method == "CHAP"
        assert auth.state is AuthState.SUCCESS

    def test_libiscsi_upper_case_hex_accepted(self):
        auth = chap_target()
        sent = start_chap(auth)
        challenge = bytes.fromhex(sent["CHAP_C"][2:])
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET, challenge)
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"),
                          ("CHAP_R", "0X" + response[2:].upper())])
        assert step.state is AuthState.SUCCESS

    def test_base64_response_accepted(self):
        auth = chap_target()
        sent = start_chap(auth)
        challenge = bytes.fromhex(sent["CHAP_C"][2:])
        digest = hashlib.md5(bytes([int(sent["CHAP_I"])]) + INITIATOR_SECRET + challenge).digest()
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"),
                          ("CHAP_R", "0b" + base64.b64encode(digest).decode())])
        assert step.state is AuthState.SUCCESS

    def test_wrong_secret(self):
        auth = chap_target()
        sent = start_chap(auth)
        wrong = md5_response(int(sent["CHAP_I"]), b"not-the-secret!!",
                             bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", wrong)])
        assert step.state is AuthState.FAILURE
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE
        assert (step.status.status_class, step.status.status_detail) == (2, 1)
        assert INITIATOR_SECRET.decode() not in step.reason
        # once failed, it stays failed
        assert auth.step([("CHAP_N", "x"), ("CHAP_R", wrong)]).state is AuthState.FAILURE

    def test_truncated_response(self):
        auth = chap_target()
        sent = start_chap(auth)
        right = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                             bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", right[:-2])])
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE

    def test_unknown_name(self):
        auth = chap_target()
        start_chap(auth)
        step = auth.step([("CHAP_N", "iqn.intruder:x"), ("CHAP_R", "0x" + "00" * 16)])
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE

    @pytest.mark.parametrize("keys", [[("CHAP_N", "iqn.a:b")], [("CHAP_R", "0x00")], []])
    def test_missing_name_or_response(self, keys):
        auth = chap_target()
        start_chap(auth)
        assert auth.step(keys).status is LoginStatus.MISSING_PARAMETER

    def test_missing_algorithm(self):
        auth = chap_target()
        auth.step([("AuthMethod", "CHAP")])
        assert auth.step([]).status is LoginStatus.MISSING_PARAMETER

    def test_malformed_response_is_initiator_error(self):
        auth = chap_target()
        start_chap(auth)
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", "zz")])
        assert step.status is LoginStatus.INITIATOR_ERROR

    def test_keys_after_success_refused(self):
        auth = ChapTargetAuth()
        assert auth.step([("AuthMethod", "None")]).state is AuthState.SUCCESS
        assert auth.step([]).state is AuthState.SUCCESS
        assert auth.step([("CHAP_A", "5")]).state is AuthState.FAILURE


class TestAlgorithmChoice:
    @pytest.mark.parametrize("offer,allowed,expected", [
        ("5", (5, 6, 7, 8), "5"),
        ("7,5", (5, 6, 7, 8), "7"),      # the initiator's order decides (§6.2.1)
        ("6,7", (5, 7), "7"),
        ("7,5", (5,), "5"),
        ("foo,5", (5,), "5"),            # values not understood are ignored
        ("0x5", (5,), "5"),
    ])
    def test_first_supported_of_initiator_list(self, offer, allowed, expected):
        sent = start_chap(chap_target(algorithms=allowed), offer)
        assert sent["CHAP_A"] == expected

    def test_challenge_as_long_as_digest(self):
        sent = start_chap(chap_target(), "7")
        assert len(bytes.fromhex(sent["CHAP_C"][2:])) == 32
        sent = start_chap(chap_target(), "5")
        assert len(bytes.fromhex(sent["CHAP_C"][2:])) == 16

    def test_no_common_algorithm(self):
        auth = chap_target(algorithms=(7,))
        auth.step([("AuthMethod", "CHAP")])
        step = auth.step([("CHAP_A", "5,6")])
        assert step.keys == [("CHAP_A", "Reject")]
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE

    def test_method_and_algorithm_in_one_request(self):
        auth = chap_target()
        step = auth.step([("AuthMethod", "CHAP"), ("CHAP_A", "5")])
        assert [k for k, _ in step.keys] == ["AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C"]

    def test_bad_configuration(self):
        with pytest.raises(ValueError):
            ChapTargetAuth(USERS.get, algorithms=(4,))
        with pytest.raises(ValueError):
            ChapTargetAuth(None, required=True)


class TestAuthMethod:
    def test_chap_required_initiator_offers_none(self):
        step = chap_target().step([("AuthMethod", "None")])
        assert step.keys == [("AuthMethod", "Reject")]
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE

    def test_chap_required_no_auth_method(self):
        auth = chap_target()
        assert auth.required
        assert auth.step([("InitiatorName", "iqn.a:b")]).status is LoginStatus.AUTHENTICATION_FAILURE

    def test_no_chap_configured(self):
        auth = ChapTargetAuth()
        assert not auth.required
        step = auth.step([("AuthMethod", "CHAP,None")])
        assert (step.keys, step.state, step.transit) == ([("AuthMethod", "None")],
                                                         AuthState.SUCCESS, True)
        assert ChapTargetAuth().step([]).state is AuthState.SUCCESS
        assert ChapTargetAuth().step([("AuthMethod", "CHAP")]).status is \
            LoginStatus.AUTHENTICATION_FAILURE

    @pytest.mark.parametrize("offer,expected", [("CHAP,None", "CHAP"), ("None,CHAP", "None"),
                                                ("SRP,CHAP", "CHAP"), ("KRB5,None", "None")])
    def test_optional_chap_follows_initiator_order(self, offer, expected):
        auth = ChapTargetAuth(USERS.get, required=False)
        assert auth.step([("AuthMethod", offer)]).keys == [("AuthMethod", expected)]


# ----------------------------------------------------------------------------- mutual


def run_mutual(target_auth: ChapTargetAuth, initiator: ChapInitiatorAuth):
    """Feed the two sides into each other until one finishes; return the last steps."""
    out = initiator.start()
    for _ in range(6):
        back = target_auth.step(out.keys)
        if back.state is AuthState.FAILURE:
            return out, back
        out = initiator.step(back.keys)
        if out.state is not AuthState.CONTINUE or back.state is AuthState.SUCCESS:
            return out, back
    raise AssertionError("exchange did not finish")


class TestMutual:
    def initiator(self, **kw) -> ChapInitiatorAuth:
        kw.setdefault("mutual", TARGET_CREDS)
        kw.setdefault("random_bytes", counting_random())
        return ChapInitiatorAuth(
            ChapCredentials("iqn.2004-10.com.ubuntu:01:guest", INITIATOR_SECRET), **kw)

    def test_target_answers_initiator_challenge(self):
        auth = chap_target(mutual=TARGET_CREDS)
        sent = start_chap(auth)
        their_challenge = b"\xaa" * 16
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                                bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", response),
                          ("CHAP_I", "77"), ("CHAP_C", "0x" + their_challenge.hex())])
        assert step.state is AuthState.SUCCESS
        assert dict(step.keys) == {"CHAP_N": TARGET_CREDS.username,
                                   "CHAP_R": md5_response(77, TARGET_SECRET, their_challenge)}

    def test_full_exchange_both_sides(self):
        ini, tgt = self.initiator(), chap_target(mutual=TARGET_CREDS)
        last_ini, last_tgt = run_mutual(tgt, ini)
        assert last_tgt.state is AuthState.SUCCESS and last_ini.state is AuthState.SUCCESS
        assert ini.state is AuthState.SUCCESS and tgt.peer_name.endswith("guest")

    def test_initiator_offers_only_chap_when_mutual(self):
        ini = self.initiator()
        assert ini.start().keys == [("AuthMethod", "CHAP")]
        assert ini.step([("AuthMethod", "None")]).state is AuthState.FAILURE

    def test_reflected_challenge_drops_connection(self):
        auth = chap_target(mutual=TARGET_CREDS)
        sent = start_chap(auth)
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                                bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", response),
                          ("CHAP_I", sent["CHAP_I"]), ("CHAP_C", sent["CHAP_C"].upper().replace("0X", "0x"))])
        assert step.state is AuthState.FAILURE and step.drop_connection
        assert step.keys == []

    def test_mutual_requested_but_not_configured(self):
        auth = chap_target()
        sent = start_chap(auth)
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                                bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", response),
                          ("CHAP_I", "1"), ("CHAP_C", "0x" + "bb" * 16)])
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE

    def test_same_secret_both_directions_refused(self):
        auth = chap_target(mutual=ChapCredentials("iqn.t:1", INITIATOR_SECRET))
        sent = start_chap(auth)
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                                bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"), ("CHAP_R", response),
                          ("CHAP_I", "1"), ("CHAP_C", "0x" + "bb" * 16)])
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE
        with pytest.raises(ValueError):
            ChapInitiatorAuth(ChapCredentials("a", INITIATOR_SECRET),
                              mutual=ChapCredentials("b", INITIATOR_SECRET))

    @pytest.mark.parametrize("extra,status", [
        ([("CHAP_I", "1")], LoginStatus.MISSING_PARAMETER),
        ([("CHAP_C", "0x" + "bb" * 16)], LoginStatus.MISSING_PARAMETER),
        ([("CHAP_I", "256"), ("CHAP_C", "0x" + "bb" * 16)], LoginStatus.INITIATOR_ERROR),
        ([("CHAP_I", "1"), ("CHAP_C", "0x" + "bb" * 1025)], LoginStatus.INITIATOR_ERROR),
    ])
    def test_bad_mutual_challenge(self, extra, status):
        auth = chap_target(mutual=TARGET_CREDS)
        sent = start_chap(auth)
        response = md5_response(int(sent["CHAP_I"]), INITIATOR_SECRET,
                                bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.2004-10.com.ubuntu:01:guest"),
                          ("CHAP_R", response)] + extra)
        assert step.status is status

    def test_initiator_detects_wrong_target_secret(self):
        impostor = ChapCredentials(TARGET_CREDS.username, b"impostor-secret-xx")
        last_ini, last_tgt = run_mutual(chap_target(mutual=impostor), self.initiator())
        assert last_tgt.state is AuthState.SUCCESS     # the target thinks all is well
        assert last_ini.state is AuthState.FAILURE      # but the initiator refuses it
        assert last_ini.status is LoginStatus.AUTHENTICATION_FAILURE

    def test_initiator_detects_wrong_target_name(self):
        other = ChapCredentials("iqn.other:t", TARGET_SECRET)
        last_ini, _ = run_mutual(chap_target(mutual=other), self.initiator())
        assert last_ini.state is AuthState.FAILURE

    def test_initiator_never_reuses_target_challenge(self):
        # a random source that repeats the target's challenge first
        chunks = iter([b"\x05", b"\x01" * 16, b"\x01" * 16, b"\x02" * 16])
        ini = self.initiator(random_bytes=lambda n: next(chunks)[:n].ljust(n, b"\x09"))
        ini.start()
        ini.step([("AuthMethod", "CHAP")])
        step = ini.step([("CHAP_A", "5"), ("CHAP_I", "3"), ("CHAP_C", "0x" + "01" * 16)])
        assert dict(step.keys)["CHAP_C"] == "0x" + "02" * 16


# ----------------------------------------------------------------------------- initiator


class TestInitiator:
    def test_one_way_wire_format(self):
        ini = ChapInitiatorAuth(ChapCredentials("iqn.i:1", INITIATOR_SECRET))
        assert ini.start().keys == [("AuthMethod", "CHAP,None")]
        assert ini.step([("AuthMethod", "CHAP")]).keys == [("CHAP_A", "7,5")]
        step = ini.step([("CHAP_A", "5"), ("CHAP_I", "9"), ("CHAP_C", "0x0102030405")])
        assert step.state is AuthState.SUCCESS and step.transit
        assert step.keys == [("CHAP_N", "iqn.i:1"),
                             ("CHAP_R", md5_response(9, INITIATOR_SECRET, bytes([1, 2, 3, 4, 5])))]

    def test_target_picks_none(self):
        ini = ChapInitiatorAuth(ChapCredentials("iqn.i:1", INITIATOR_SECRET))
        ini.start()
        step = ini.step([("AuthMethod", "None")])
        assert step.state is AuthState.SUCCESS and step.keys == [] and ini.method == "None"

    def test_without_credentials(self):
        ini = ChapInitiatorAuth()
        assert ini.start().keys == [("AuthMethod", "None")]
        assert ini.step([("AuthMethod", "CHAP")]).state is AuthState.FAILURE

    @pytest.mark.parametrize("keys", [
        [("CHAP_A", "6"), ("CHAP_I", "1"), ("CHAP_C", "0x01")],     # not offered
        [("CHAP_A", "Reject")],
        [("CHAP_A", "5"), ("CHAP_C", "0x01")],                      # no CHAP_I
        [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "nothex")],
    ])
    def test_bad_challenge_from_target(self, keys):
        ini = ChapInitiatorAuth(ChapCredentials("iqn.i:1", INITIATOR_SECRET))
        ini.start()
        ini.step([("AuthMethod", "CHAP")])
        assert ini.step(keys).state is AuthState.FAILURE

    def test_misuse(self):
        ini = ChapInitiatorAuth()
        with pytest.raises(ValueError):
            ini.step([])
        ini.start()
        with pytest.raises(ValueError):
            ini.start()
        with pytest.raises(ValueError):
            ChapInitiatorAuth(None, mutual=TARGET_CREDS)


# ----------------------------------------------------------------------------- secrets


class TestSecrets:
    def test_length_limits(self):
        ChapCredentials("u", "x" * CHAP_SECRET_MIN_LEN)
        ChapCredentials("u", b"x" * CHAP_SECRET_MAX_LEN)
        with pytest.raises(ValueError) as err:
            ChapCredentials("u", "tooshort-11")
        assert "tooshort" not in str(err.value)
        with pytest.raises(ValueError):
            ChapCredentials("u", b"x" * (CHAP_SECRET_MAX_LEN + 1))
        with pytest.raises(ValueError):
            ChapCredentials("", b"x" * 16)

    def test_secret_not_in_repr(self):
        creds = ChapCredentials("user", "a-very-secret-value")
        assert "a-very-secret-value" not in repr(creds) and "user" in repr(creds)
        assert creds.secret == b"a-very-secret-value"

    def test_short_secret_from_lookup_refused_without_leaking(self):
        auth = ChapTargetAuth({"iqn.a:b": "short"}.get, random_bytes=counting_random())
        sent = start_chap(auth)
        response = md5_response(int(sent["CHAP_I"]), b"short", bytes.fromhex(sent["CHAP_C"][2:]))
        step = auth.step([("CHAP_N", "iqn.a:b"), ("CHAP_R", response)])
        assert step.status is LoginStatus.AUTHENTICATION_FAILURE
        assert "short" not in step.reason.replace("shorter", "")


@settings(max_examples=60)
@given(alg=st.sampled_from([5, 6, 7, 8]),
       isecret=st.binary(min_size=CHAP_SECRET_MIN_LEN, max_size=64),
       tsecret=st.binary(min_size=CHAP_SECRET_MIN_LEN, max_size=64),
       seed=st.binary(max_size=16))
def test_both_sides_agree_for_any_secret_and_algorithm(alg, isecret, tsecret, seed):
    if isecret == tsecret:
        return

    def stream(label: bytes):
        counter = itertools.count()
        return lambda n: b"".join(
            hashlib.sha256(seed + label + next(counter).to_bytes(4, "big")).digest()
            for _ in range(0, n, 32))[:n]

    ini = ChapInitiatorAuth(ChapCredentials("iqn.i:1", isecret),
                            mutual=ChapCredentials("iqn.t:1", tsecret), algorithms=(alg,),
                            random_bytes=stream(b"initiator"))
    tgt = ChapTargetAuth({"iqn.i:1": isecret}.get, mutual=ChapCredentials("iqn.t:1", tsecret),
                         random_bytes=stream(b"target"))
    last_ini, last_tgt = run_mutual(tgt, ini)
    assert (last_ini.state, last_tgt.state) == (AuthState.SUCCESS, AuthState.SUCCESS)

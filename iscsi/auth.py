"""CHAP authentication for the iSCSI security stage, sans-IO, both roles.

RFC 1994 (CHAP) as used by RFC 7143 §12.1.3, one-way and mutual.  The response
is ``H(identifier || secret || challenge)`` with H chosen by CHAP_A: 5 = MD5 (the
one every initiator has), 6 = SHA-1, 7 = SHA-256, 8 = SHA3-256 (IANA "PPP
Authentication Algorithms" registry, which RFC 7143 defers to).

Public API
----------
``ChapCredentials(username, secret)``
    A CHAP name and secret; refuses secrets shorter than
    :data:`CHAP_SECRET_MIN_LEN` or longer than :data:`CHAP_SECRET_MAX_LEN`.
    Its repr never shows the secret.
``ChapTargetAuth(credentials_lookup=None, *, required=None, mutual=None,
algorithms=(5, 6, 7, 8), random_bytes=secrets.token_bytes)``
    The target's side.  ``credentials_lookup(chap_name)`` returns that
    initiator's secret (bytes or str) or None.  ``mutual`` is the target's own
    name and secret, used when the initiator asks the target to authenticate.
    ``step(received_pairs) -> AuthStep`` for every Login Request of the security
    stage (after :class:`iscsi.keys.Negotiator` has checked the keys).
``ChapInitiatorAuth(credentials=None, *, mutual=None, algorithms=(7, 5),
random_bytes=secrets.token_bytes)``
    The initiator's side.  ``start() -> AuthStep`` gives the AuthMethod offer for
    the first Login Request; ``step(received_pairs) -> AuthStep`` for every Login
    Response of the security stage.  ``mutual`` is the name and secret the
    target must prove.
``AuthStep(keys, state, status, reason, transit, drop_connection)``
    ``keys`` to add to the next PDU; ``state`` CONTINUE / SUCCESS / FAILURE;
    on FAILURE ``status`` is the Login status to answer with (a target) and
    ``reason`` a log line (never a secret).  ``transit``: the PDU carrying these
    keys may set T=1.  ``drop_connection``: close the TCP connection instead of
    answering (RFC 7143 §12.1.3 for a reflected challenge).

A target that requires CHAP must also refuse a login that skips the security
stage (first Login Request with CSG=1): check ``ChapTargetAuth.required``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .keys import (LoginStatus, MAX_LARGE_BINARY_LEN, MAX_VALUE_LEN, ProtocolError,
                   decode_binary, encode_hex, parse_number)

__all__ = [
    "CHAP_ALGORITHMS", "CHAP_SECRET_MIN_LEN", "CHAP_SECRET_MAX_LEN",
    "ChapCredentials", "ChapTargetAuth", "ChapInitiatorAuth", "AuthStep", "AuthState",
    "chap_response",
]

#: CHAP_A values (IANA PPP authentication algorithms) to hashlib names.
CHAP_ALGORITHMS: dict[int, str] = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}

#: RFC 7143 §9.2.1: a CHAP secret with fewer than 96 random bits needs IPsec
#: encryption to resist offline dictionary attacks; this stack has no IPsec, so
#: 12 bytes is the floor.
CHAP_SECRET_MIN_LEN = 12
#: The RFC sets no upper bound; open-iscsi keeps secrets in a 256-byte buffer
#: (AUTH_STR_MAX_LEN, NUL included), so a longer one could not be configured there.
CHAP_SECRET_MAX_LEN = 255
#: Challenges as long as the digest and never below 16 bytes (RFC 1994 asks for
#: unpredictable, never-repeated challenges; LIO sends the digest length).
CHAP_CHALLENGE_MIN_LEN = 16

Pairs = list[tuple[str, str]]
RandomBytes = Callable[[int], bytes]


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(Identifier || secret || Challenge), identifier one octet."""
    h = hashlib.new(CHAP_ALGORITHMS[algorithm])
    h.update(bytes((identifier,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def _secret_bytes(secret: bytes | str) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def _check_secret(secret: bytes) -> str | None:
    if len(secret) < CHAP_SECRET_MIN_LEN:
        return f"CHAP secret shorter than {CHAP_SECRET_MIN_LEN} bytes (RFC 7143 §9.2.1)"
    if len(secret) > CHAP_SECRET_MAX_LEN:
        return f"CHAP secret longer than {CHAP_SECRET_MAX_LEN} bytes"
    return None


def _check_name(name: str) -> None:
    if not name or len(name.encode("utf-8")) > MAX_VALUE_LEN or "\x00" in name:
        raise ValueError(f"CHAP name must be 1..{MAX_VALUE_LEN} bytes without NUL")


@dataclass(frozen=True)
class ChapCredentials:
    """A CHAP name and its secret.  The secret stays out of repr and errors."""

    username: str
    secret: bytes = field(repr=False)

    def __init__(self, username: str, secret: bytes | str) -> None:
        _check_name(username)
        raw = _secret_bytes(secret)
        problem = _check_secret(raw)
        if problem:
            raise ValueError(f"{problem} for CHAP name {username!r}")
        object.__setattr__(self, "username", username)
        object.__setattr__(self, "secret", raw)


class AuthState(enum.Enum):
    CONTINUE = "continue"
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class AuthStep:
    keys: Pairs = field(default_factory=list)
    state: AuthState = AuthState.CONTINUE
    status: LoginStatus = LoginStatus.SUCCESS
    reason: str = ""
    transit: bool = False
    drop_connection: bool = False


def _unique(received: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The keys of one PDU by name.  A key sent twice is refused, never resolved (RFC 7143 §6.2:
    a redeclaration "MUST be detected" and the login rejected): a second CHAP_N or CHAP_R must
    not leave it to us which one was meant."""
    found: dict[str, str] = {}
    for key, value in received:
        if key in found:
            raise ProtocolError(f"{key} sent twice in one PDU (RFC 7143 §6.2)")
        found[key] = value
    return found


def _parse_identifier(text: str) -> int:
    value = parse_number(text)
    if value > 255:
        raise ProtocolError("CHAP_I must be 0..255 (RFC 1994: one octet)")
    return value


def _parse_binary(text: str, what: str) -> bytes:
    value = decode_binary(text)
    if not 1 <= len(value) <= MAX_LARGE_BINARY_LEN:
        raise ProtocolError(f"{what} must be 1..{MAX_LARGE_BINARY_LEN} bytes (RFC 7143 §12.1.3)")
    return value


def _algorithm_list(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        try:
            out.append(parse_number(item))
        except ProtocolError:
            continue            # §6.2.1: values not understood are ignored
    return out


def _challenge_len(algorithm: int) -> int:
    return max(CHAP_CHALLENGE_MIN_LEN, hashlib.new(CHAP_ALGORITHMS[algorithm]).digest_size)


def _validate_algorithms(algorithms: Sequence[int]) -> tuple[int, ...]:
    algs = tuple(algorithms)
    if not algs or any(a not in CHAP_ALGORITHMS for a in algs):
        raise ValueError(f"CHAP algorithms must come from {sorted(CHAP_ALGORITHMS)}")
    return algs


class _Target(enum.Enum):
    START = 1
    WAIT_ALGORITHM = 2
    WAIT_RESPONSE = 3
    DONE = 4
    FAILED = 5


class ChapTargetAuth:
    """The target's security stage: AuthMethod choice, then CHAP as responder."""

    def __init__(self, credentials_lookup: Callable[[str], bytes | str | None] | None = None, *,
                 required: bool | None = None, mutual: ChapCredentials | None = None,
                 algorithms: Sequence[int] = (5, 6, 7, 8),
                 random_bytes: RandomBytes = secrets.token_bytes) -> None:
        if required is None:
            required = credentials_lookup is not None
        if required and credentials_lookup is None:
            raise ValueError("CHAP required but no credentials lookup given")
        self.required = required
        self._lookup = credentials_lookup
        self._mutual = mutual
        self._algorithms = _validate_algorithms(algorithms)
        self._random = random_bytes
        self._state = _Target.START
        self._failure: AuthStep | None = None
        self._algorithm = 0
        self._identifier = 0
        self._challenge = b""
        #: "CHAP" or "None" once chosen
        self.method: str | None = None
        #: the CHAP_N the initiator proved, on success
        self.peer_name: str | None = None

    @property
    def state(self) -> AuthState:
        if self._state is _Target.DONE:
            return AuthState.SUCCESS
        if self._state is _Target.FAILED:
            return AuthState.FAILURE
        return AuthState.CONTINUE

    def _fail(self, status: LoginStatus, reason: str, keys: Pairs | None = None,
              drop: bool = False) -> AuthStep:
        self._state = _Target.FAILED
        self._failure = AuthStep(keys or [], AuthState.FAILURE, status, reason, False, drop)
        return self._failure

    def _supported_methods(self) -> list[str]:
        if self.required:
            return ["CHAP"]
        return ["CHAP", "None"] if self._lookup is not None else ["None"]

    def step(self, received: Iterable[tuple[str, str]]) -> AuthStep:
        """Consume one Login Request's keys; return what to answer."""
        if self._state is _Target.FAILED:
            assert self._failure is not None
            return self._failure
        try:
            got = _unique(received)
            if self._state is _Target.START:
                return self._on_method(got)
            if self._state is _Target.WAIT_ALGORITHM:
                return self._on_algorithm(got, [])
            if self._state is _Target.WAIT_RESPONSE:
                return self._on_response(got)
        except ProtocolError as exc:
            return self._fail(LoginStatus.INITIATOR_ERROR, f"malformed CHAP key: {exc}")
        # DONE: nothing more may be negotiated in this stage
        if any(k.startswith("CHAP_") or k == "AuthMethod" for k in got):
            return self._fail(LoginStatus.INITIATOR_ERROR,
                              "authentication keys after authentication completed")
        return AuthStep(state=AuthState.SUCCESS, transit=True)

    def _on_method(self, got: dict[str, str]) -> AuthStep:
        offer = got.get("AuthMethod")
        if offer is None:
            if self.required:
                return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                                  "initiator offered no AuthMethod; CHAP is required")
            self.method = "None"
            self._state = _Target.DONE
            return AuthStep(state=AuthState.SUCCESS, transit=True)
        supported = self._supported_methods()
        # §6.2.1: the first value of the initiator's list that we support
        choice = next((m for m in offer.split(",") if m in supported), None)
        if choice is None:
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"no acceptable AuthMethod in {offer[:64]!r} (need {supported})",
                              [("AuthMethod", "Reject")])
        self.method = choice
        keys: Pairs = [("AuthMethod", choice)]
        if choice == "None":
            self._state = _Target.DONE
            return AuthStep(keys, AuthState.SUCCESS, transit=True)
        self._state = _Target.WAIT_ALGORITHM
        if "CHAP_A" in got:             # an eager initiator: both in one PDU
            return self._on_algorithm(got, keys)
        return AuthStep(keys)

    def _on_algorithm(self, got: dict[str, str], keys: Pairs) -> AuthStep:
        offer = got.get("CHAP_A")
        if offer is None:
            return self._fail(LoginStatus.MISSING_PARAMETER, "CHAP_A missing after AuthMethod=CHAP")
        # A list is legal and must be parsed (open-iscsi issue 180).
        choice = next((a for a in _algorithm_list(offer) if a in self._algorithms), None)
        if choice is None:
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"no supported CHAP algorithm in {offer[:64]!r}",
                              keys + [("CHAP_A", "Reject")])
        self._algorithm = choice
        self._identifier = self._random(1)[0]
        self._challenge = self._random(_challenge_len(choice))
        self._state = _Target.WAIT_RESPONSE
        return AuthStep(keys + [("CHAP_A", str(choice)), ("CHAP_I", str(self._identifier)),
                                ("CHAP_C", encode_hex(self._challenge))])

    def _on_response(self, got: dict[str, str]) -> AuthStep:
        name, response = got.get("CHAP_N"), got.get("CHAP_R")
        if name is None or response is None:
            return self._fail(LoginStatus.MISSING_PARAMETER, "CHAP_N or CHAP_R missing")
        their_id, their_challenge = got.get("CHAP_I"), got.get("CHAP_C")
        mutual = their_id is not None or their_challenge is not None
        if mutual and (their_id is None or their_challenge is None):
            return self._fail(LoginStatus.MISSING_PARAMETER, "mutual CHAP needs CHAP_I and CHAP_C")
        if mutual:
            challenge = _parse_binary(their_challenge, "CHAP_C")
            identifier = _parse_identifier(their_id)
            # RFC 7143 §12.1.3: a challenge reflected back at us is an attack on
            # the other direction; the responder closes the connection.
            if hmac.compare_digest(challenge, self._challenge):
                return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                                  "initiator reflected the target's CHAP challenge", drop=True)
        proof = decode_binary(response)
        secret = self._lookup(name) if self._lookup else None
        expected_len = hashlib.new(CHAP_ALGORITHMS[self._algorithm]).digest_size
        if secret is None:
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE, f"unknown CHAP name {name!r}")
        secret = _secret_bytes(secret)
        problem = _check_secret(secret)
        if problem:
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"configured {problem} for CHAP name {name!r}")
        expected = chap_response(self._algorithm, self._identifier, secret, self._challenge)
        if len(proof) != expected_len or not hmac.compare_digest(proof, expected):
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"wrong CHAP response for {name!r}")
        self.peer_name = name
        if not mutual:
            self._state = _Target.DONE
            return AuthStep(state=AuthState.SUCCESS, transit=True)
        if self._mutual is None:
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"{name!r} asked the target to authenticate; no target "
                              "credentials are configured")
        if hmac.compare_digest(self._mutual.secret, secret):
            # RFC 7143 §12.1.3: a secret for one direction MUST NOT serve the other.
            return self._fail(LoginStatus.AUTHENTICATION_FAILURE,
                              f"target and initiator secrets are the same for {name!r}")
        answer = chap_response(self._algorithm, identifier, self._mutual.secret, challenge)
        self._state = _Target.DONE
        return AuthStep([("CHAP_N", self._mutual.username), ("CHAP_R", encode_hex(answer))],
                        AuthState.SUCCESS, transit=True)


class _Initiator(enum.Enum):
    START = 1
    WAIT_METHOD = 2
    WAIT_CHALLENGE = 3
    WAIT_TARGET_PROOF = 4
    DONE = 5
    FAILED = 6


class ChapInitiatorAuth:
    """The initiator's security stage: offers AuthMethod, answers the challenge,
    and with ``mutual`` challenges the target in turn."""

    def __init__(self, credentials: ChapCredentials | None = None, *,
                 mutual: ChapCredentials | None = None, algorithms: Sequence[int] = (7, 5),
                 random_bytes: RandomBytes = secrets.token_bytes) -> None:
        if mutual is not None:
            if credentials is None:
                raise ValueError("mutual CHAP needs the initiator's own credentials")
            if hmac.compare_digest(mutual.secret, credentials.secret):
                raise ValueError("the target's secret must differ from the initiator's "
                                 "(RFC 7143 §12.1.3)")
        self._credentials = credentials
        self._mutual = mutual
        self._algorithms = _validate_algorithms(algorithms)
        self._random = random_bytes
        self._state = _Initiator.START
        self._failure: AuthStep | None = None
        self._algorithm = 0
        self._identifier = 0
        self._challenge = b""
        self.method: str | None = None

    @property
    def state(self) -> AuthState:
        if self._state is _Initiator.DONE:
            return AuthState.SUCCESS
        if self._state is _Initiator.FAILED:
            return AuthState.FAILURE
        return AuthState.CONTINUE

    def _offer(self) -> list[str]:
        if self._credentials is None:
            return ["None"]
        # With mutual CHAP the target must prove itself: do not let it pick None.
        return ["CHAP"] if self._mutual is not None else ["CHAP", "None"]

    def _fail(self, reason: str, status: LoginStatus = LoginStatus.AUTHENTICATION_FAILURE) -> AuthStep:
        self._state = _Initiator.FAILED
        self._failure = AuthStep([], AuthState.FAILURE, status, reason)
        return self._failure

    def start(self) -> AuthStep:
        """Keys for the first Login Request of the security stage."""
        if self._state is not _Initiator.START:
            raise ValueError("start() called twice")
        self._state = _Initiator.WAIT_METHOD
        offer = self._offer()
        return AuthStep([("AuthMethod", ",".join(offer))], transit="None" in offer)

    def step(self, received: Iterable[tuple[str, str]]) -> AuthStep:
        """Consume one Login Response's keys; return what to send next."""
        if self._state is _Initiator.FAILED:
            assert self._failure is not None
            return self._failure
        if self._state is _Initiator.START:
            raise ValueError("call start() first")
        try:
            got = _unique(received)
            if self._state is _Initiator.WAIT_METHOD:
                return self._on_method(got)
            if self._state is _Initiator.WAIT_CHALLENGE:
                return self._on_challenge(got)
            if self._state is _Initiator.WAIT_TARGET_PROOF:
                return self._on_proof(got)
        except ProtocolError as exc:
            return self._fail(f"malformed CHAP key from target: {exc}", LoginStatus.INITIATOR_ERROR)
        return AuthStep(state=AuthState.SUCCESS, transit=True)

    def _on_method(self, got: dict[str, str]) -> AuthStep:
        answer = got.get("AuthMethod")
        if answer is None or answer not in self._offer():
            return self._fail(f"target answered AuthMethod={answer!r} to {','.join(self._offer())}")
        self.method = answer
        if answer == "None":
            self._state = _Initiator.DONE
            return AuthStep(state=AuthState.SUCCESS, transit=True)
        self._state = _Initiator.WAIT_CHALLENGE
        return AuthStep([("CHAP_A", ",".join(str(a) for a in self._algorithms))])

    def _on_challenge(self, got: dict[str, str]) -> AuthStep:
        algorithm, identifier, challenge = got.get("CHAP_A"), got.get("CHAP_I"), got.get("CHAP_C")
        if algorithm is None or identifier is None or challenge is None:
            return self._fail("target sent no CHAP_A/CHAP_I/CHAP_C")
        chosen = parse_number(algorithm) if algorithm != "Reject" else None
        if chosen not in self._algorithms:
            return self._fail(f"target chose CHAP_A={algorithm[:16]!r}, not one we offered")
        assert self._credentials is not None and chosen is not None
        their_id = _parse_identifier(identifier)
        their_challenge = _parse_binary(challenge, "CHAP_C")
        proof = chap_response(chosen, their_id, self._credentials.secret, their_challenge)
        keys: Pairs = [("CHAP_N", self._credentials.username), ("CHAP_R", encode_hex(proof))]
        if self._mutual is None:
            self._state = _Initiator.DONE
            return AuthStep(keys, AuthState.SUCCESS, transit=True)
        self._algorithm = chosen
        self._identifier = self._random(1)[0]
        # Never send the target's own challenge back (RFC 7143 §12.1.3); a fresh
        # random one equals it only by accident, so draw again in that case.
        for _ in range(8):
            self._challenge = self._random(_challenge_len(chosen))
            if self._challenge != their_challenge:
                break
        else:
            return self._fail("random source keeps repeating the target's challenge",
                              LoginStatus.INITIATOR_ERROR)
        self._state = _Initiator.WAIT_TARGET_PROOF
        keys += [("CHAP_I", str(self._identifier)), ("CHAP_C", encode_hex(self._challenge))]
        return AuthStep(keys, transit=True)

    def _on_proof(self, got: dict[str, str]) -> AuthStep:
        assert self._mutual is not None
        name, response = got.get("CHAP_N"), got.get("CHAP_R")
        if name is None or response is None:
            return self._fail("target did not answer the mutual CHAP challenge")
        if name != self._mutual.username:
            return self._fail(f"target authenticated as {name!r}, expected "
                              f"{self._mutual.username!r}")
        expected = chap_response(self._algorithm, self._identifier, self._mutual.secret,
                                 self._challenge)
        if not hmac.compare_digest(decode_binary(response), expected):
            return self._fail("wrong mutual CHAP response from the target")
        self._state = _Initiator.DONE
        return AuthStep(state=AuthState.SUCCESS, transit=True)

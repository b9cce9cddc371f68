"""CHAP for iSCSI login (RFC 7143 section 12.1.3, RFC 1994): the target's side, one-way and
mutual, with MD5 (``CHAP_A=5``), the one algorithm every initiator offers.

The exchange, in the security stage::

    initiator: CHAP_A=5[,...]
    target:    CHAP_A=5  CHAP_I=<id>  CHAP_C=0x<challenge>
    initiator: CHAP_N=<user>  CHAP_R=0x<MD5(id || secret || challenge)>
               [mutual: CHAP_I=<id'>  CHAP_C=0x<challenge'>]
    target:    [mutual: CHAP_N=<target user>  CHAP_R=0x<MD5(id' || target secret || challenge')>]

Binary values arrive as ``0x`` hexadecimal or ``0b`` base64 (RFC 7143 section 6.1). A challenge
the initiator sends back to us (a reflection attack) is refused, as are short secrets: Windows'
initiator insists on at least 12 characters, and so do we.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from dingyuan.errors import UsageError
from dingyuan.exports.iscsi.pdu import DETAIL_AUTHENTICATION_FAILURE, STATUS_INITIATOR_ERROR
from dingyuan.exports.iscsi.text import LoginRefused, Pairs

MD5 = "5"
MIN_SECRET_LENGTH = 12
CHALLENGE_LENGTH = 16
MAX_CHALLENGE_LENGTH = 1024


@dataclass(frozen=True)
class Credentials:
    """A CHAP user name and secret."""

    user: str
    secret: str

    def __post_init__(self) -> None:
        if not self.user or any(c in self.user for c in "\0\n"):
            raise UsageError("a CHAP user name must be non-empty text")
        if len(self.secret) < MIN_SECRET_LENGTH:
            raise UsageError(
                f"a CHAP secret must be at least {MIN_SECRET_LENGTH} characters "
                "(Windows' initiator refuses shorter ones)"
            )

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """``USER:SECRET`` as the command line takes it."""
        user, sep, secret = text.partition(":")
        if not sep:
            raise UsageError(f"CHAP credentials must be USER:SECRET, got {text!r}")
        return cls(user, secret)


def _refused(detail: str) -> LoginRefused:
    return LoginRefused(
        detail, status_class=STATUS_INITIATOR_ERROR, status_detail=DETAIL_AUTHENTICATION_FAILURE
    )


def decode_binary(value: str) -> bytes:
    """A CHAP binary value: ``0x`` hexadecimal or ``0b`` base64."""
    try:
        if value[:2] in ("0x", "0X"):
            digits = value[2:]
            return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error) as e:
        raise _refused(f"malformed CHAP value {value[:40]!r}") from e
    raise _refused(f"a CHAP value must start with 0x or 0b, got {value[:40]!r}")


def response(identifier: int, secret: str, challenge: bytes) -> bytes:
    """MD5(identifier || secret || challenge), the CHAP response (RFC 1994 section 4.1)."""
    return hashlib.md5(bytes([identifier]) + secret.encode() + challenge).digest()


class ChapAuthenticator:
    """The target's half of one CHAP exchange; :meth:`step` takes the initiator's CHAP keys of
    each login PDU and returns the keys to answer, until :attr:`done`."""

    def __init__(self, initiator: Credentials, target: Credentials | None = None) -> None:
        self._initiator = initiator
        self._target = target
        self._identifier = secrets.randbelow(256)
        self._challenge = secrets.token_bytes(CHALLENGE_LENGTH)
        self._sent_challenge = False
        self.done = False

    def step(self, keys: dict[str, str]) -> Pairs:
        if not self._sent_challenge:
            algorithms = keys.get("CHAP_A")
            if algorithms is None:
                raise _refused("CHAP was chosen but the initiator sent no CHAP_A")
            if MD5 not in algorithms.split(","):
                raise _refused(f"no supported CHAP algorithm in CHAP_A={algorithms} (we need 5, MD5)")
            self._sent_challenge = True
            return [
                ("CHAP_A", MD5),
                ("CHAP_I", str(self._identifier)),
                ("CHAP_C", "0x" + self._challenge.hex()),
            ]
        name, answer = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or answer is None:
            raise _refused("the initiator did not answer the CHAP challenge (CHAP_N, CHAP_R)")
        expected = response(self._identifier, self._initiator.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), self._initiator.user.encode())
        if not (hmac.compare_digest(decode_binary(answer), expected) and name_ok):
            raise _refused(f"CHAP authentication failed for user {name!r}")
        self.done = True
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        return self._mutual(keys)

    def _mutual(self, keys: dict[str, str]) -> Pairs:
        if self._target is None:
            raise _refused("the initiator asked for mutual CHAP, which this target has no secret for")
        try:
            identifier = int(keys["CHAP_I"])
            challenge = decode_binary(keys["CHAP_C"])
        except (KeyError, ValueError) as e:
            raise _refused("mutual CHAP needs both CHAP_I and CHAP_C") from e
        if not 0 <= identifier <= 255 or not 0 < len(challenge) <= MAX_CHALLENGE_LENGTH:
            raise _refused("malformed mutual CHAP identifier or challenge")
        if challenge == self._challenge:
            raise _refused("the initiator sent our own CHAP challenge back (reflection)")
        proof = response(identifier, self._target.secret, challenge)
        return [("CHAP_N", self._target.user), ("CHAP_R", "0x" + proof.hex())]

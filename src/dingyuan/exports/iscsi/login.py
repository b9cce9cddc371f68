"""The login phase of one iSCSI connection (RFC 7143 sections 6 and 11.12-11.13), as a pure state
machine: :meth:`Login.receive` takes each Login Request and returns the Login Response to send,
and the negotiated outcome once the connection enters the full feature phase.

Stages: security (0) -> operational (1) -> full feature (3). An initiator may start in either of
the first two and may skip the second; a target that requires CHAP refuses to leave the security
stage before the initiator authenticated. Text split over several PDUs (the C bit) is gathered
first; every response answers the keys of the request it follows.

What ends the login is raised as :class:`~dingyuan.exports.iscsi.text.LoginRefused` with its
status class and detail; :func:`refusal` builds the response that tells the initiator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from dingyuan.exports.access import IpAddress
from dingyuan.exports.iscsi.chap import ChapAuthenticator, Credentials
from dingyuan.exports.iscsi.pdu import (
    DETAIL_AUTHENTICATION_FAILURE,
    DETAIL_INITIATOR_ERROR,
    DETAIL_INVALID_DURING_LOGIN,
    DETAIL_MISSING_PARAMETER,
    DETAIL_UNSUPPORTED_VERSION,
    OFF_CMD_SN,
    OFF_DATA_SN,
    OFF_EXP_STAT_SN,
    OFF_MAX_CMD_SN,
    OP_LOGIN_REQUEST,
    OP_LOGIN_RESPONSE,
    STAGE_FULL_FEATURE,
    STAGE_OPERATIONAL,
    STAGE_SECURITY,
    STATUS_INITIATOR_ERROR,
    Bhs,
    Pdu,
    ProtocolViolation,
    build_tail,
    isid_tsih,
    login_flags,
)
from dingyuan.exports.iscsi.text import (
    REJECT,
    LoginRefused,
    Pairs,
    SessionParams,
    TargetConfig,
    build_text,
    negotiate,
    parse_text,
    require_names,
)

#: the only version of the protocol there is (RFC 3720 and 7143 both say 0x00)
VERSION = 0x00
#: how far past ExpCmdSN an initiator may number its commands (MaxCmdSN - ExpCmdSN + 1)
COMMAND_WINDOW = 64
#: what we accept of one login's text, over all its PDUs
MAX_LOGIN_TEXT = 65536

_CHAP_KEYS = ("CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C")


class TargetAuth(Protocol):
    """What login needs to know of a target: its name and how initiators authenticate."""

    @property
    def name(self) -> str: ...

    @property
    def chap(self) -> Credentials | None:
        """Credentials the initiator must prove (None: no authentication)."""
        ...

    @property
    def mutual_chap(self) -> Credentials | None:
        """The target's own credentials, for initiators that authenticate the target."""
        ...


#: finds a target for a normal session's TargetName, for the initiator at the given address;
#: raises LoginRefused (not found, or not authorized) when there is none for it
FindTarget = Callable[[str, IpAddress | None], TargetAuth]


@dataclass(frozen=True)
class LoginResult:
    """What a completed login leaves: the session it asked for and its parameters."""

    params: SessionParams
    isid: bytes
    tsih: int  # 0: a new session; else the session this connection joins
    cid: int
    cmd_sn: int  # the initiator's next CmdSN: the session's ExpCmdSN
    target: TargetAuth | None  # None for a discovery session


class Login:
    """The target side of the login phase of one connection."""

    def __init__(
        self,
        find_target: FindTarget,
        *,
        peer: IpAddress | None,
        config: TargetConfig,
        stat_sn: int,
        portal_group_tag: int = 1,
    ) -> None:
        self._find_target = find_target
        self._peer = peer
        self._config = config
        self._tpgt = portal_group_tag
        #: the StatSN the next response carries
        self.stat_sn = stat_sn
        self._params = SessionParams()
        self._stage: int | None = None
        self._first: Bhs | None = None
        self._target: TargetAuth | None = None
        self._named = False  # the first request's text named the initiator and the target
        self._chap: ChapAuthenticator | None = None
        self._authenticated = False
        self._pending_text = bytearray()
        self._sent_tpgt = False
        self._declared_mrdsl = False

    def receive(self, pdu: Pdu, *, tsih_for: Callable[[LoginResult], int]) -> tuple[Pdu, LoginResult | None]:
        """The response to one Login Request, and the result when the login is complete.

        ``tsih_for`` binds a complete login to its session (creating one for TSIH 0) and returns
        the session's TSIH for the final response; it raises LoginRefused to refuse the session.
        """
        bhs = pdu.bhs
        if bhs.opcode != OP_LOGIN_REQUEST:
            raise LoginRefused(
                f"opcode {bhs.opcode:#04x} during login",
                status_class=STATUS_INITIATOR_ERROR,
                status_detail=DETAIL_INVALID_DURING_LOGIN,
            )
        self._check_header(bhs)
        self._pending_text += pdu.data
        if len(self._pending_text) > MAX_LOGIN_TEXT:
            raise _initiator_error(f"login text over {MAX_LOGIN_TEXT} bytes")
        if bhs.continue_:
            if bhs.transit:
                raise _initiator_error("a login request may not set both T and C")
            return self._response(bhs, b"", transit=False), None
        try:
            offers = parse_text(bytes(self._pending_text), max_length=MAX_LOGIN_TEXT)
        except ProtocolViolation as e:  # malformed text: refused with a response that says so
            raise _initiator_error(str(e)) from e
        self._pending_text.clear()
        answers = self._answer(offers)
        transit = bhs.transit and self._may_leave(bhs.csg)
        result = None
        tsih = bhs.tsih
        if transit and bhs.nsg == STAGE_FULL_FEATURE:
            require_names(self._params)
            result = LoginResult(
                params=self._params,
                isid=bhs.isid,
                tsih=bhs.tsih,
                cid=bhs.cid,
                cmd_sn=bhs.cmd_sn,
                target=self._target,
            )
            tsih = tsih_for(result)
        response = self._response(bhs, build_text(answers), transit=transit, tsih=tsih)
        if transit:
            self._stage = bhs.nsg
        return response, result

    # -- steps --------------------------------------------------------------------------------

    def _check_header(self, bhs: Bhs) -> None:
        if self._first is None:
            if bhs.version_min > VERSION:
                raise LoginRefused(
                    f"iSCSI version {bhs.version_min} is not supported (we speak {VERSION})",
                    status_class=STATUS_INITIATOR_ERROR,
                    status_detail=DETAIL_UNSUPPORTED_VERSION,
                )
            if bhs.csg not in (STAGE_SECURITY, STAGE_OPERATIONAL):
                raise _initiator_error(f"a login cannot start in stage {bhs.csg}")
            self._first = bhs
            self._stage = bhs.csg
        elif bhs.isid != self._first.isid or bhs.tsih != self._first.tsih or bhs.cid != self._first.cid:
            raise _initiator_error("ISID, TSIH or CID changed during the login")
        if bhs.csg != self._stage:
            raise _initiator_error(f"login request for stage {bhs.csg} while in stage {self._stage}")
        if bhs.transit and (bhs.nsg <= bhs.csg or bhs.nsg == 2):
            raise _initiator_error(f"cannot move from login stage {bhs.csg} to {bhs.nsg}")

    def _answer(self, offers: Pairs) -> Pairs:
        keys = dict(offers)
        if not self._named:
            self._name_parties(keys)
        else:
            for key, known in (
                ("InitiatorName", self._params.initiator_name),
                ("TargetName", self._params.target_name),
                ("SessionType", self._params.session_type),
            ):
                if key in keys and keys[key] != known:
                    raise _initiator_error(f"{key} changed during the login")
        answers: Pairs = []
        if not self._sent_tpgt and self._target is not None:
            answers.append(("TargetPortalGroupTag", str(self._tpgt)))
            self._sent_tpgt = True
        chap_keys = {k: v for k, v in keys.items() if k in _CHAP_KEYS}
        plain = [(k, v) for k, v in offers if k not in _CHAP_KEYS]
        config = replace(self._config, auth_methods=("CHAP",) if self._needs_chap else ("None",))
        negotiated, self._params = negotiate(plain, self._params, config)
        answers += negotiated
        if "AuthMethod" in keys:
            self._start_auth(dict(negotiated).get("AuthMethod"))
        if chap_keys:
            if self._chap is None or self._stage != STAGE_SECURITY:
                raise _auth_failure("CHAP keys without CHAP having been chosen in the security stage")
            answers += self._chap.step(chap_keys)
            self._authenticated = self._chap.done
        if self._stage == STAGE_OPERATIONAL and not self._declared_mrdsl:
            self._declared_mrdsl = True
            if "MaxRecvDataSegmentLength" not in keys:
                answers.append(("MaxRecvDataSegmentLength", str(self._config.max_recv_data_segment_length)))
        return answers

    def _name_parties(self, keys: dict[str, str]) -> None:
        """The first login request names the initiator and, for a normal session, the target
        (RFC 7143 section 6.3): the target, and so whether CHAP is required, is known before any
        other key is answered, and cannot change afterwards."""
        self._named = True
        if "InitiatorName" not in keys:
            raise LoginRefused(
                "the first login request must carry InitiatorName",
                status_class=STATUS_INITIATOR_ERROR,
                status_detail=DETAIL_MISSING_PARAMETER,
            )
        if keys.get("SessionType", "Normal") == "Normal":
            name = keys.get("TargetName")
            if not name:
                raise LoginRefused(
                    "the first login request of a normal session must carry TargetName",
                    status_class=STATUS_INITIATOR_ERROR,
                    status_detail=DETAIL_MISSING_PARAMETER,
                )
            self._target = self._find_target(name, self._peer)

    @property
    def _needs_chap(self) -> bool:
        return self._target is not None and self._target.chap is not None

    def _start_auth(self, chosen: str | None) -> None:
        if self._stage != STAGE_SECURITY or self._chap is not None:
            return
        if chosen == "CHAP" and self._target is not None and self._target.chap is not None:
            self._chap = ChapAuthenticator(self._target.chap, self._target.mutual_chap)
        elif chosen in (None, REJECT) and self._needs_chap:
            raise _auth_failure("this target requires CHAP and the initiator did not offer it")
        elif chosen == "None":
            self._authenticated = True

    def _may_leave(self, stage: int) -> bool:
        """Whether the target agrees to leave ``stage`` now: the security stage only once the
        initiator is authenticated (or no authentication is needed)."""
        if stage == STAGE_SECURITY and self._needs_chap and not self._authenticated:
            if self._chap is None:
                raise _auth_failure("this target requires CHAP authentication")
            return False
        if stage == STAGE_OPERATIONAL and self._needs_chap and not self._authenticated:
            raise _auth_failure("this target requires CHAP: log in through the security stage")
        return True

    def _response(self, req: Bhs, data: bytes, *, transit: bool, tsih: int | None = None) -> Pdu:
        stat_sn = self.stat_sn
        self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
        return login_response(
            req,
            data,
            transit=transit,
            tsih=req.tsih if tsih is None else tsih,
            stat_sn=stat_sn,
        )


def login_response(
    req: Bhs,
    data: bytes,
    *,
    transit: bool,
    tsih: int,
    stat_sn: int,
    status_class: int = 0,
    status_detail: int = 0,
) -> Pdu:
    """A Login Response to ``req``; ExpCmdSN is the request's CmdSN (login PDUs are immediate)."""
    exp_cmd_sn = req.cmd_sn
    words = {
        OFF_CMD_SN: stat_sn,
        OFF_EXP_STAT_SN: exp_cmd_sn,
        OFF_MAX_CMD_SN: (exp_cmd_sn + COMMAND_WINDOW - 1) & 0xFFFFFFFF,
        OFF_DATA_SN: (status_class << 24) | (status_detail << 16),
    }
    return Pdu(
        bhs=Bhs(
            opcode=OP_LOGIN_RESPONSE,
            final=transit,
            flags=login_flags(csg=req.csg & 3, nsg=req.nsg if transit else 0),
            specific=bytes([VERSION, VERSION]),
            lun=isid_tsih(req.isid, tsih),
            itt=req.itt,
            tail=build_tail(words),
        ),
        data=data,
    )


def refusal(req: Bhs, refused: LoginRefused, *, stat_sn: int) -> Pdu:
    """The Login Response that ends a login with ``refused``'s status."""
    return login_response(
        req,
        b"",
        transit=False,
        tsih=0,
        stat_sn=stat_sn,
        status_class=refused.status_class,
        status_detail=refused.status_detail,
    )


def _initiator_error(detail: str) -> LoginRefused:
    return LoginRefused(detail, status_class=STATUS_INITIATOR_ERROR, status_detail=DETAIL_INITIATOR_ERROR)


def _auth_failure(detail: str) -> LoginRefused:
    return LoginRefused(
        detail, status_class=STATUS_INITIATOR_ERROR, status_detail=DETAIL_AUTHENTICATION_FAILURE
    )

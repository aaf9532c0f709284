"""Secure aggregation (shared/secagg.py): real X25519, ChaCha20, AEAD, Shamir and Ed25519; no mocks.

The honest protocol's properties; what a malicious server tries against it is in test_malicious_server.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir

from fedrec.shared import secagg
from fedrec.shared.identity import Authority, DeviceIdentity
from fedrec.shared.secagg import ClientSession, SecAggError, ServerSession, SessionParams

L = 1000
U64 = np.uint64
AUTHORITY = Authority.create()
PIN = AUTHORITY.key.public_key()  # what every device pinned


def ids(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


@functools.cache
def identity(pid: str) -> DeviceIdentity:
    return DeviceIdentity.enrol(pid, AUTHORITY)


def signed_advert(params: SessionParams, pid: str, c: bytes, s: bytes) -> dict[str, bytes]:
    """An advertisement of keys (c, s) for `pid` signed with pid's real enrolled key: what a member that
    deviates (a malicious client, not the server) can produce."""
    keys = {"c": c, "s": s}
    return {**keys, "cert": identity(pid).certificate,
            "sig": identity(pid).sign(secagg._advert_message(params, pid, keys))}


def random_inputs(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Full-range uint64 values, plus entries at 2**64 - 1 so that every sum wraps."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in names:
        x = rng.integers(0, 2**64, size=L, dtype=U64)
        x[:10] = np.iinfo(U64).max
        out[u] = x
    return out


def plain_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(L, dtype=U64)
    for x in vectors:
        total += x
    return total


def high_bit_mean(x: np.ndarray) -> float:
    return float((x >> U64(63)).mean())


def bit_mean(x: np.ndarray) -> float:
    return float(np.unpackbits(x.view(np.uint8)).mean())


@dataclass
class Round:
    """One run of the protocol, with every message kept for inspection."""

    params: SessionParams
    clients: dict[str, ClientSession]
    server: ServerSession
    inputs: dict[str, np.ndarray]
    broadcast: dict[str, dict[str, bytes]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    routed: dict[str, dict[str, bytes]] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    alive: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    signatures: dict[str, bytes] = field(default_factory=dict)
    replies: dict[str, dict[str, bytes]] = field(default_factory=dict)
    b_seeds: dict[str, bytes] = field(default_factory=dict)
    serialise: bool = False

    def fresh(self, u: str) -> ClientSession:
        """The client's session, through a serialise/deserialise when asked (as if in a new process)."""
        if self.serialise:
            self.clients[u] = ClientSession.from_bytes(self.clients[u].to_bytes())
        return self.clients[u]


def start(n: int = 6, t: int = 4, *, c: int = 0, serialise: bool = False, seed: int = 0) -> tuple[Round, dict]:
    params = SessionParams(session_id=os.urandom(16), threshold=t, vector_length=L, colluders=c, server_round=3,
                           plan_digest=os.urandom(32))
    clients, adverts = {}, {}
    for u in ids(n):
        clients[u], adverts[u] = ClientSession.start(params, identity(u))
    rnd = Round(params, clients, ServerSession(params), random_inputs(ids(n), seed), serialise=serialise)
    return rnd, adverts


def to_masked(rnd: Round, adverts: dict, *, drop_keys: Collection[str] = ()) -> Round:
    """Keys, shares and masking; clients in drop_keys vanish after advertising keys."""
    rnd.broadcast, rnd.excluded = rnd.server.receive_keys(adverts)
    sent = {u: rnd.fresh(u).share_keys(rnd.broadcast, PIN) for u in rnd.clients if u not in drop_keys}
    rnd.routed = rnd.server.route_shares(sent)
    for u in rnd.routed:
        c = rnd.fresh(u)
        rnd.b_seeds[u] = bytes.fromhex(json.loads(c.to_bytes())["b"])  # the test peeks, to check the residue
        rnd.masked[u] = c.mask(rnd.routed[u], rnd.inputs[u])
    return rnd


def finish(rnd: Round, *, drop_shares: Collection[str] = (), signers: list[str] | None = None,
           responders: list[str] | None = None) -> np.ndarray:
    """Clients in drop_shares computed a masked vector that never arrives; `signers` (default: all alive) take
    part in the consistency round, `responders` (default: all signers) answer the unmask request."""
    rnd.alive, rnd.dead = rnd.server.receive_masked(
        {u: m for u, m in rnd.masked.items() if u not in drop_shares})
    signers = rnd.alive if signers is None else signers
    sigs = {u: rnd.fresh(u).consistency(rnd.alive, rnd.dead, identity(u)) for u in signers}
    rnd.signatures = rnd.server.receive_signatures(sigs)
    for u in signers if responders is None else responders:
        rnd.replies[u] = rnd.fresh(u).unmask(rnd.signatures)
    return rnd.server.unmask(rnd.replies)


def run_round(n: int = 6, t: int = 4, *, c: int = 0, drop_keys: Collection[str] = (),
              drop_shares: Collection[str] = (), signers: list[str] | None = None,
              responders: list[str] | None = None, serialise: bool = False) -> tuple[np.ndarray, Round]:
    rnd, adverts = start(n, t, c=c, serialise=serialise)
    to_masked(rnd, adverts, drop_keys=drop_keys)
    return finish(rnd, drop_shares=drop_shares, signers=signers, responders=responders), rnd


def test_sum_equals_plain_wrapping_sum():
    total, rnd = run_round(7, 4)
    expected = plain_sum(list(rnd.inputs.values()))
    assert total.dtype == U64 and total.shape == (L,)
    np.testing.assert_array_equal(total, expected)
    # the inputs overflow 64 bits: the exact integer sum differs from the wrapped one
    assert sum(int(x[0]) for x in rnd.inputs.values()) != int(expected[0])
    assert rnd.server.survivors == ids(7)
    assert rnd.excluded == {} and set(rnd.signatures) == set(ids(7))


def test_sum_with_colluders_assumed():
    """c > 0 only tightens the bound on |U1| (2t > |U1| + c); an honest round sums as before."""
    total, rnd = run_round(6, 4, c=1, drop_shares={"p2"})
    assert rnd.alive == ["p0", "p1", "p3", "p4", "p5"] and rnd.dead == ["p2"]
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))


def test_masked_vectors_look_uniform():
    rnd, adverts = start(5, 3)
    rnd.inputs["p0"] = np.zeros(L, dtype=U64)  # structured inputs: the masks alone must hide them
    rnd.inputs["p1"] = np.arange(L, dtype=U64)
    to_masked(rnd, adverts)
    for u in ("p0", "p1"):
        m = rnd.masked[u]
        assert not np.any(m == rnd.inputs[u])
        assert abs(high_bit_mean(m) - 0.5) < 0.08
        assert abs(bit_mean(m) - 0.5) < 0.01
    assert not np.any(rnd.masked["p0"] == rnd.masked["p1"])
    assert len(np.unique(rnd.masked["p1"] - rnd.masked["p0"])) == L  # not a shifted copy either


def test_dropout_after_keys():
    total, rnd = run_round(6, 4, drop_keys={"p2"})
    assert "p2" not in rnd.routed and rnd.dead == []
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))


def test_dropout_after_shares_removes_pairwise_masks_via_s_key():
    total, rnd = run_round(7, 4, drop_keys={"p0"}, drop_shares={"p3", "p5"})
    assert rnd.dead == ["p3", "p5"] and rnd.alive == ["p1", "p2", "p4", "p6"]
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))


def test_dropout_during_consistency_and_unmask():
    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    total = finish(rnd, drop_shares={"p1"}, responders=["p0", "p3", "p4", "p5"])  # exactly t respond
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))

    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    total = finish(rnd, signers=["p1", "p2", "p4", "p5"])  # p0 and p3 vanish before signing; t signed
    assert rnd.alive == ids(6) and set(rnd.signatures) == {"p1", "p2", "p4", "p5"}
    np.testing.assert_array_equal(total, plain_sum(list(rnd.inputs.values())))  # their inputs still count

    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    with pytest.raises(SecAggError, match="below threshold"):
        finish(rnd, responders=["p0", "p3", "p4"])

    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    with pytest.raises(SecAggError, match="3 valid consistency signatures, below threshold 4"):
        finish(rnd, signers=["p0", "p3", "p4"])


def test_too_few_survivors_abort():
    rnd, adverts = start(5, 4)
    to_masked(rnd, adverts)
    with pytest.raises(SecAggError, match=r"\|U3\| = 3 is below threshold 4"):
        rnd.server.receive_masked({u: rnd.masked[u] for u in ("p0", "p1", "p2")})


def test_too_few_in_u1_or_u2():
    rnd, adverts = start(5, 4)
    few = {u: adverts[u] for u in ("p0", "p1", "p2")}
    with pytest.raises(SecAggError, match=r"\|U1\|"):
        rnd.server.receive_keys(few)
    with pytest.raises(SecAggError, match=r"\|U1\|"):
        rnd.clients["p0"].share_keys(few, PIN)

    bc, _ = rnd.server.receive_keys(adverts)
    sent = {u: rnd.clients[u].share_keys(bc, PIN) for u in ("p0", "p1", "p2")}
    with pytest.raises(SecAggError, match=r"\|U2\|"):
        rnd.server.route_shares(sent)
    ct = {u: sent[u]["p0"] for u in ("p1", "p2")}  # client side: only 3 in U2 counting itself
    with pytest.raises(SecAggError, match=r"\|U2\|"):
        rnd.clients["p0"].mask(ct, rnd.inputs["p0"])


def test_server_excludes_bad_advertisements_and_goes_on():
    rnd, adverts = start(6, 4)
    forged = dict(adverts["p5"], sig=bytes(64))
    stray = dict(adverts["p4"])
    stray.pop("cert")
    bc, excluded = rnd.server.receive_keys(dict(adverts, p4=stray, p5=forged))
    assert set(bc) == set(ids(4)) and set(excluded) == {"p4", "p5"}
    assert "not signed" in excluded["p5"] and "exactly" in excluded["p4"]
    sent = {u: rnd.clients[u].share_keys(bc, PIN) for u in ids(4)}
    routed = rnd.server.route_shares(sent)
    masked = {u: rnd.clients[u].mask(routed[u], rnd.inputs[u]) for u in ids(4)}
    alive, dead = rnd.server.receive_masked(masked)
    sigs = rnd.server.receive_signatures({u: rnd.clients[u].consistency(alive, dead, identity(u)) for u in alive})
    total = rnd.server.unmask({u: rnd.clients[u].unmask(sigs) for u in alive})
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in ids(4)]))


def test_late_reply_of_dead_node_stays_masked():
    total, rnd = run_round(6, 4, drop_shares={"p3"})
    assert rnd.dead == ["p3"]
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))

    # By the protocol the server now holds t shares of p3's s key, and never a share of its b.
    s_shares = [reply["p3"] for reply in rnd.replies.values()]
    s_sk = secagg._combine(s_shares, rnd.params.threshold, "p3")
    assert secagg._public(s_sk) == rnd.broadcast["p3"]["s"]

    late = rnd.masked["p3"].copy()  # the reply that arrived after p3 was declared dead
    for v in rnd.routed:
        if v != "p3":
            pair = secagg._pair_mask(s_sk, rnd.broadcast[v]["s"], rnd.params, "p3", v)
            late = late - pair if "p3" < v else late + pair
    x = rnd.inputs["p3"]
    assert np.count_nonzero(late == x) == 0
    assert abs(high_bit_mean(late - x) - 0.5) < 0.08
    # ... and what remains is exactly PRG(b), which only b's shares (never sent for p3) would remove
    self_mask = secagg._prg(secagg._self_mask_key(rnd.b_seeds["p3"], rnd.params.session_id), L)
    np.testing.assert_array_equal(late - self_mask, x)


def test_client_refuses_bad_survivor_views():
    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    c = rnd.clients["p0"]
    everyone = ids(6)
    me = identity("p0")
    with pytest.raises(SecAggError, match="overlap"):  # would hand out both shares of p5
        c.consistency(everyone, ["p5"], me)
    with pytest.raises(SecAggError, match=r"\|alive\|"):
        c.consistency(["p0", "p1", "p2"], ["p3", "p4", "p5"], me)
    with pytest.raises(SecAggError, match="not in the alive list"):
        c.consistency(["p1", "p2", "p3", "p4"], ["p0", "p5"], me)
    with pytest.raises(SecAggError, match="partition U2"):  # a stranger
        c.consistency(everyone + ["stranger"], [], me)
    with pytest.raises(SecAggError, match="partition U2"):  # p5 neither alive nor dead
        c.consistency(everyone[:5], [], me)
    with pytest.raises(SecAggError, match="duplicate"):
        c.consistency(["p0", "p1", "p2", "p2"], [], me)
    with pytest.raises(SecAggError, match="not this session's member"):
        c.consistency(everyone, [], identity("p1"))
    assert c.stage == "masked"  # refused views changed nothing
    view = (everyone[:5], ["p5"])
    sigs = {u: rnd.clients[u].consistency(*view, identity(u)) for u in everyone[:5]}
    reply = c.unmask(sigs)
    assert set(reply) == set(everyone)
    assert all(len(share) == 36 for share in reply.values())
    with pytest.raises(SecAggError, match="already answered"):
        c.unmask(sigs)
    with pytest.raises(SecAggError, match="already answered"):  # also after a trip through bytes
        ClientSession.from_bytes(c.to_bytes()).unmask(sigs)


def test_answer_once_reveals_b_of_the_alive_and_s_of_the_dead_only():
    rnd, adverts = start(6, 4)
    to_masked(rnd, adverts)
    alive, dead = rnd.server.receive_masked({u: m for u, m in rnd.masked.items() if u != "p2"})
    held = json.loads(rnd.clients["p0"].to_bytes())["held"]
    sigs = {u: rnd.clients[u].consistency(alive, dead, identity(u)) for u in alive}
    reply = rnd.clients["p0"].unmask(sigs)
    assert reply == {**{v: bytes.fromhex(held[v]["b"]) for v in alive}, "p2": bytes.fromhex(held["p2"]["s"])}
    state = json.loads(rnd.clients["p0"].to_bytes())
    assert state["stage"] == "done" and state["held"] is None and state["c_sk"] is None and state["s_sk"] is None


def test_prg_uses_the_whole_seed():
    b1 = bytearray(os.urandom(32))
    b2 = bytearray(b1)
    delta = os.urandom(4)
    for word in (1, 2):  # same change in two words: low 32 bits and the 32-bit xor fold stay equal
        for i in range(4):
            b2[4 * word + i] ^= delta[i]
    b1, b2 = bytes(b1), bytes(b2)

    def fold(b: bytes) -> int:
        out = 0
        for w in range(8):
            out ^= int.from_bytes(b[4 * w:4 * w + 4], "little")
        return out

    assert b1 != b2 and b1[:4] == b2[:4] and fold(b1) == fold(b2)
    sid = os.urandom(16)
    p1 = secagg._prg(secagg._self_mask_key(b1, sid), L)
    p2 = secagg._prg(secagg._self_mask_key(b2, sid), L)
    assert np.count_nonzero(p1 == p2) == 0
    assert abs(bit_mean(p1 ^ p2) - 0.5) < 0.01
    # deterministic for a key; a new session gives a new stream from the same seed
    np.testing.assert_array_equal(p1, secagg._prg(secagg._self_mask_key(b1, sid), L))
    assert np.count_nonzero(p1 == secagg._prg(secagg._self_mask_key(b1, os.urandom(16)), L)) == 0
    k = os.urandom(32)
    np.testing.assert_array_equal(secagg._prg(k, L)[:100], secagg._prg(k, 100))


def test_pair_key_is_symmetric_and_bound_to_the_pair():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    su, sv = (X25519PrivateKey.generate().private_bytes_raw() for _ in range(2))
    pu, pv = secagg._public(su), secagg._public(sv)
    sid = os.urandom(16)
    k_uv = secagg._pair_mask_key(su, pv, sid, "u", "v")
    assert k_uv == secagg._pair_mask_key(sv, pu, sid, "v", "u")
    assert k_uv != secagg._pair_mask_key(su, pv, os.urandom(16), "u", "v")
    assert k_uv != secagg._pair_mask_key(su, pv, sid, "u", "w")


def test_fast_shamir_combine_agrees_with_pycryptodome():
    secret = os.urandom(32)
    shares = secagg._split(secret, 5, 9)
    picked = [shares[i] for i in (8, 1, 4, 6, 2, 7)]  # any t or more, in any order
    assert secagg._combine(picked, 5, "x") == secret
    parsed = sorted(secagg._parse_share(s, "x") for s in picked)[:5]
    assert (Shamir.combine([(i, a) for i, a, _ in parsed])
            + Shamir.combine([(i, b) for i, _, b in parsed])) == secret
    with pytest.raises(SecAggError, match="fewer than threshold"):
        secagg._combine(picked[:4], 5, "x")
    with pytest.raises(SecAggError, match="duplicate"):
        secagg._combine(picked[:5] + picked[:1], 5, "x")


def test_serialised_between_every_stage():
    total, rnd = run_round(6, 4, drop_keys={"p4"}, drop_shares={"p1"}, serialise=True)
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))
    state = json.loads(rnd.clients["p0"].to_bytes())  # JSON, and the used secrets are gone
    assert state["stage"] == "done" and state["s_sk"] is None and state["held"] is None

    # a state stored between consistency and unmask keeps the view it signed, and only that view
    rnd, adverts = start(5, 3, serialise=True)
    to_masked(rnd, adverts)
    alive, dead = rnd.server.receive_masked(rnd.masked)
    sigs = {u: rnd.fresh(u).consistency(alive, dead, identity(u)) for u in alive}
    stored = rnd.fresh("p0").to_bytes()
    assert json.loads(stored)["view"] == {"alive": alive, "dead": dead}
    with pytest.raises(SecAggError, match="out of order"):
        ClientSession.from_bytes(stored).consistency(alive[:4], alive[4:], identity("p0"))
    assert set(ClientSession.from_bytes(stored).unmask(sigs)) == set(alive)


def test_stages_out_of_order():
    rnd, adverts = start(5, 3)
    c = rnd.clients["p0"]
    with pytest.raises(SecAggError, match="out of order"):
        c.mask({}, rnd.inputs["p0"])
    with pytest.raises(SecAggError, match="out of order"):
        c.consistency(ids(5), [], identity("p0"))
    with pytest.raises(SecAggError, match="out of order"):
        c.unmask({})
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.route_shares({})
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.receive_signatures({})
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.unmask({})
    with pytest.raises(SecAggError, match="receive_masked"):
        _ = rnd.server.survivors
    bc, _ = rnd.server.receive_keys(adverts)
    c.share_keys(bc, PIN)
    with pytest.raises(SecAggError, match="out of order"):
        c.share_keys(bc, PIN)
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.receive_keys(adverts)
    with pytest.raises(SecAggError, match="out of order"):
        c.unmask({})
    with pytest.raises(SecAggError, match="out of order"):
        c.consistency(ids(5), [], identity("p0"))


def test_client_checks_on_keys_params_and_inputs():
    params = SessionParams(os.urandom(16), 3, L, colluders=2, server_round=7, plan_digest=os.urandom(32))
    assert SessionParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    with pytest.raises(SecAggError, match="threshold"):
        ClientSession.start(SessionParams(os.urandom(16), 1, L), identity("p0"))
    with pytest.raises(SecAggError, match="threshold"):
        ServerSession(SessionParams(os.urandom(16), 1, L))
    with pytest.raises(SecAggError, match="colluders"):
        SessionParams(os.urandom(16), 3, L, colluders=3)
    with pytest.raises(SecAggError, match="plan_digest"):
        SessionParams(os.urandom(16), 3, L, plan_digest=b"short")
    with pytest.raises(SecAggError, match="malformed"):
        SessionParams.from_dict({k: v for k, v in params.to_dict().items() if k != "plan_digest"})

    rnd, adverts = start(4, 3)
    c = rnd.clients["p0"]
    with pytest.raises(SecAggError, match="no pinned enrolment authority"):
        c.share_keys(adverts, None)
    swapped = dict(adverts, p0=dict(adverts["p0"], s=adverts["p1"]["s"]))
    with pytest.raises(SecAggError):  # own s key replaced (and now advertised twice, and not signed)
        c.share_keys(swapped, PIN)
    other = ClientSession.start(rnd.params, identity("p0"))[1]  # validly signed, but not this session's keys
    with pytest.raises(SecAggError, match="own public keys"):
        c.share_keys(dict(adverts, p0=other), PIN)
    # an enrolled member reflecting another member's keys, signed with its own identity
    reflected = signed_advert(rnd.params, "p3", adverts["p2"]["c"], adverts["p2"]["s"])
    with pytest.raises(SecAggError, match="advertised twice"):
        c.share_keys(dict(adverts, p3=reflected), PIN)
    with pytest.raises(SecAggError, match="32 bytes"):
        c.share_keys(dict(adverts, p3=signed_advert(rnd.params, "p3", b"x", adverts["p3"]["s"])), PIN)
    with pytest.raises(SecAggError, match="exactly"):
        c.share_keys(dict(adverts, p3={k: v for k, v in adverts["p3"].items() if k != "sig"}), PIN)
    with pytest.raises(SecAggError, match="exactly"):
        c.share_keys(dict(adverts, p3=dict(adverts["p3"], extra=b"")), PIN)
    assert c.stage == "keys"

    rnd, adverts = start(4, 3)
    bc, _ = rnd.server.receive_keys(adverts)
    sent = {u: rnd.clients[u].share_keys(bc, PIN) for u in ids(4)}
    routed = rnd.server.route_shares(sent)
    bad = np.arange(L, dtype=np.int64) - 7
    with pytest.raises(SecAggError, match="uint64") as err:
        rnd.clients["p0"].mask(routed["p0"], bad)
    assert "-7" not in str(err.value)  # messages never quote input data
    with pytest.raises(SecAggError, match="not another member"):
        rnd.clients["p0"].mask({"p0": b"x" * 100}, rnd.inputs["p0"])


def test_tampered_or_misbound_ciphertexts_rejected():
    rnd, adverts = start(5, 3)
    states = {u: c.to_bytes() for u, c in rnd.clients.items()}
    bc, _ = rnd.server.receive_keys(adverts)
    sent = {u: rnd.clients[u].share_keys(bc, PIN) for u in ids(5)}
    routed = rnd.server.route_shares(sent)

    flipped = bytearray(routed["p0"]["p1"])
    flipped[20] ^= 1
    with pytest.raises(SecAggError, match="'p1' failed authentication"):
        rnd.clients["p0"].mask(dict(routed["p0"], p1=bytes(flipped)), rnd.inputs["p0"])

    # p1's same keys used under another session id (every advert re-signed for it): its ciphertext does not
    # open in this one
    other = dataclasses.replace(rnd.params, session_id=os.urandom(16))
    state = json.loads(states["p1"])
    state["params"] = other.to_dict()
    resigned = {u: signed_advert(other, u, a["c"], a["s"]) for u, a in bc.items()}
    elsewhere = ClientSession.from_bytes(json.dumps(state).encode()).share_keys(resigned, PIN)
    with pytest.raises(SecAggError, match="'p1' failed authentication"):
        rnd.clients["p0"].mask(dict(routed["p0"], p1=elsewhere["p0"]), rnd.inputs["p0"])

    # a ciphertext p1 addressed to p2, relabelled, or presented as coming from p3
    with pytest.raises(SecAggError, match="failed authentication"):
        rnd.clients["p0"].mask(dict(routed["p0"], p1=sent["p1"]["p2"]), rnd.inputs["p0"])
    with pytest.raises(SecAggError, match="'p3' failed authentication"):
        rnd.clients["p0"].mask(dict(routed["p0"], p3=routed["p0"]["p1"]), rnd.inputs["p0"])

    # the refusals left p0 able to finish the round normally
    masked = {u: rnd.clients[u].mask(routed[u], rnd.inputs[u]) for u in ids(5)}
    alive, dead = rnd.server.receive_masked(masked)
    sigs = rnd.server.receive_signatures(
        {u: rnd.clients[u].consistency(alive, dead, identity(u)) for u in alive})
    total = rnd.server.unmask({u: rnd.clients[u].unmask(sigs) for u in alive})
    np.testing.assert_array_equal(total, plain_sum(list(rnd.inputs.values())))


def test_wrong_share_indices_refused():
    """A share travels with its Shamir index: a device refuses a share that is not at its own index, and the
    server refuses an unmask reply whose shares are not at the responder's index."""
    rnd, adverts = start(5, 3)
    bc, _ = rnd.server.receive_keys(adverts)
    p1_state = json.loads(rnd.clients["p1"].to_bytes())
    sent = {u: rnd.clients[u].share_keys(bc, PIN) for u in ids(5)}
    routed = rnd.server.route_shares(sent)
    # p1 (deviating) encrypts to p0 a well-authenticated plaintext holding the shares meant for p2 (index 3)
    held = json.loads(rnd.clients["p1"].to_bytes())["held"]["p1"]
    s_sk = bytes.fromhex(p1_state["s_sk"])
    s_shares = secagg._split(s_sk, 3, 5)
    b_shares = secagg._split(os.urandom(32), 3, 5)
    assert secagg._parse_share(bytes.fromhex(held["s"]), "p1")[0] == 2  # p1 holds its own at index 2
    aead, ad = secagg._share_cipher(bytes.fromhex(p1_state["c_sk"]), bc["p0"]["c"], rnd.params, "p1", "p0")
    nonce = os.urandom(12)
    wrong = nonce + aead.encrypt(nonce, s_shares[2] + b_shares[2], ad)
    with pytest.raises(SecAggError, match="'p1' carries the wrong index"):
        rnd.clients["p0"].mask(dict(routed["p0"], p1=wrong), rnd.inputs["p0"])

    masked = {u: rnd.clients[u].mask(routed[u], rnd.inputs[u]) for u in ids(5)}
    alive, dead = rnd.server.receive_masked(masked)
    sigs = rnd.server.receive_signatures(
        {u: rnd.clients[u].consistency(alive, dead, identity(u)) for u in alive})
    replies = {u: rnd.clients[u].unmask(sigs) for u in alive}
    swapped = dict(replies, p0=replies["p1"], p1=replies["p0"])
    with pytest.raises(SecAggError, match="wrong index"):
        rnd.server.unmask(swapped)
    with pytest.raises(SecAggError, match="outside U2"):
        rnd.server.unmask(dict(replies, p0=dict(replies["p0"], stranger=replies["p0"]["p1"])))
    total = rnd.server.unmask(replies)
    np.testing.assert_array_equal(total, plain_sum(list(rnd.inputs.values())))


def test_malformed_state_rejected():
    with pytest.raises(SecAggError):
        ClientSession.from_bytes(b"not json")
    rnd, _ = start(4, 3)
    state = json.loads(rnd.clients["p0"].to_bytes())
    state["stage"] = "shared"  # claims a stage whose secrets it lacks
    with pytest.raises(SecAggError, match="incomplete"):
        ClientSession.from_bytes(json.dumps(state).encode())
    state["stage"] = "keys"
    state["params"]["threshold"] = 1  # a stored state cannot smuggle in t < 2
    state["params"]["colluders"] = 0
    with pytest.raises(SecAggError, match="threshold"):
        ClientSession.from_bytes(json.dumps(state).encode())


def test_a_low_order_mask_key_is_refused_when_shares_are_made_before_any_input_exists():
    """A mask key that cannot agree would otherwise fail only at masking, after the device trained and paid."""
    rnd, adverts = start(4, 3)
    # an enrolled member (not the server: it cannot sign for p3) advertises the all-zero point, of low order
    adverts["p3"] = signed_advert(rnd.params, "p3", adverts["p3"]["c"], bytes(32))
    with pytest.raises(SecAggError, match="key agreement failed"):
        rnd.clients["p0"].share_keys(adverts, PIN)
    assert rnd.clients["p0"].stage == "keys"

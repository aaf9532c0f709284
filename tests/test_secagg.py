"""Secure aggregation (shared/secagg.py): real X25519, ChaCha20, AEAD and Shamir; no mocks."""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir

from fedrec.shared import secagg
from fedrec.shared.secagg import ClientSession, SecAggError, ServerSession, SessionParams

L = 1000
U64 = np.uint64


def ids(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


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
    routed: dict[str, dict[str, bytes]] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    alive: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    replies: dict[str, dict[str, bytes]] = field(default_factory=dict)
    b_seeds: dict[str, bytes] = field(default_factory=dict)
    serialise: bool = False

    def fresh(self, u: str) -> ClientSession:
        """The client's session, through a serialise/deserialise when asked (as if in a new process)."""
        if self.serialise:
            self.clients[u] = ClientSession.from_bytes(self.clients[u].to_bytes())
        return self.clients[u]


def start(n: int = 6, t: int = 4, *, serialise: bool = False, seed: int = 0) -> tuple[Round, dict]:
    params = SessionParams(session_id=os.urandom(16), threshold=t, vector_length=L)
    clients, keys = {}, {}
    for u in ids(n):
        clients[u], keys[u] = ClientSession.start(params, u, min_threshold=2)
    rnd = Round(params, clients, ServerSession(params), random_inputs(ids(n), seed), serialise=serialise)
    return rnd, keys


def to_masked(rnd: Round, keys: dict, *, drop_keys: Collection[str] = ()) -> Round:
    """Keys, shares and masking; clients in drop_keys vanish after advertising keys."""
    rnd.broadcast = rnd.server.receive_keys(keys)
    sent = {u: rnd.fresh(u).share_keys(rnd.broadcast) for u in rnd.clients if u not in drop_keys}
    rnd.routed = rnd.server.route_shares(sent)
    for u in rnd.routed:
        c = rnd.fresh(u)
        rnd.b_seeds[u] = bytes.fromhex(json.loads(c.to_bytes())["b"])  # the test peeks, to check the residue
        rnd.masked[u] = c.mask(rnd.routed[u], rnd.inputs[u])
    return rnd


def finish(rnd: Round, *, drop_shares: Collection[str] = (),
           responders: list[str] | None = None) -> np.ndarray:
    """Clients in drop_shares computed a masked vector that never arrives."""
    rnd.alive, rnd.dead = rnd.server.receive_masked(
        {u: m for u, m in rnd.masked.items() if u not in drop_shares})
    for u in rnd.alive if responders is None else responders:
        rnd.replies[u] = rnd.fresh(u).unmask(rnd.alive, rnd.dead)
    return rnd.server.unmask(rnd.replies)


def run_round(n: int = 6, t: int = 4, *, drop_keys: Collection[str] = (), drop_shares: Collection[str] = (),
              responders: list[str] | None = None, serialise: bool = False) -> tuple[np.ndarray, Round]:
    rnd, keys = start(n, t, serialise=serialise)
    to_masked(rnd, keys, drop_keys=drop_keys)
    return finish(rnd, drop_shares=drop_shares, responders=responders), rnd


def test_sum_equals_plain_wrapping_sum():
    total, rnd = run_round(7, 4)
    expected = plain_sum(list(rnd.inputs.values()))
    assert total.dtype == U64 and total.shape == (L,)
    np.testing.assert_array_equal(total, expected)
    # the inputs overflow 64 bits: the exact integer sum differs from the wrapped one
    assert sum(int(x[0]) for x in rnd.inputs.values()) != int(expected[0])
    assert rnd.server.survivors == ids(7)


def test_masked_vectors_look_uniform():
    rnd, keys = start(5, 3)
    rnd.inputs["p0"] = np.zeros(L, dtype=U64)  # structured inputs: the masks alone must hide them
    rnd.inputs["p1"] = np.arange(L, dtype=U64)
    to_masked(rnd, keys)
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


def test_dropout_during_unmask():
    rnd, keys = start(6, 4)
    to_masked(rnd, keys)
    total = finish(rnd, drop_shares={"p1"}, responders=["p0", "p3", "p4", "p5"])  # exactly t respond
    np.testing.assert_array_equal(total, plain_sum([rnd.inputs[u] for u in rnd.alive]))

    rnd, keys = start(6, 4)
    to_masked(rnd, keys)
    with pytest.raises(SecAggError, match="below threshold"):
        finish(rnd, responders=["p0", "p3", "p4"])


def test_too_few_survivors_abort():
    rnd, keys = start(5, 4)
    to_masked(rnd, keys)
    with pytest.raises(SecAggError, match=r"\|U3\| = 3 is below threshold 4"):
        rnd.server.receive_masked({u: rnd.masked[u] for u in ("p0", "p1", "p2")})


def test_too_few_in_u1_or_u2():
    rnd, keys = start(5, 4)
    few = {u: keys[u] for u in ("p0", "p1", "p2")}
    with pytest.raises(SecAggError, match=r"\|U1\|"):
        rnd.server.receive_keys(few)
    with pytest.raises(SecAggError, match=r"\|U1\|"):
        rnd.clients["p0"].share_keys(few)

    bc = rnd.server.receive_keys(keys)
    sent = {u: rnd.clients[u].share_keys(bc) for u in ("p0", "p1", "p2")}
    with pytest.raises(SecAggError, match=r"\|U2\|"):
        rnd.server.route_shares(sent)
    ct = {u: sent[u]["p0"] for u in ("p1", "p2")}  # client side: only 3 in U2 counting itself
    with pytest.raises(SecAggError, match=r"\|U2\|"):
        rnd.clients["p0"].mask(ct, rnd.inputs["p0"])


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


def test_client_refuses_bad_unmask_requests():
    rnd, keys = start(6, 4)
    to_masked(rnd, keys)
    c = rnd.clients["p0"]
    everyone = ids(6)
    with pytest.raises(SecAggError, match="overlap"):  # would hand out both shares of p5
        c.unmask(everyone, ["p5"])
    with pytest.raises(SecAggError, match=r"\|alive\|"):
        c.unmask(["p0", "p1", "p2"], ["p3", "p4", "p5"])
    with pytest.raises(SecAggError, match="not in the alive list"):
        c.unmask(["p1", "p2", "p3", "p4"], ["p0", "p5"])
    with pytest.raises(SecAggError, match="outside U2"):
        c.unmask(everyone + ["stranger"], [])
    with pytest.raises(SecAggError, match="duplicate"):
        c.unmask(["p0", "p1", "p2", "p2"], [])
    # refused requests changed nothing: a valid one is answered, once
    reply = c.unmask(everyone[:5], ["p5"])
    assert set(reply) == set(everyone)
    assert all(len(share) == 36 for share in reply.values())
    with pytest.raises(SecAggError, match="already answered"):
        c.unmask(everyone[:5], ["p5"])
    with pytest.raises(SecAggError, match="already answered"):  # also after a trip through bytes
        ClientSession.from_bytes(c.to_bytes()).unmask(everyone[:5], ["p5"])


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


def test_stages_out_of_order():
    rnd, keys = start(5, 3)
    c = rnd.clients["p0"]
    with pytest.raises(SecAggError, match="out of order"):
        c.mask({}, rnd.inputs["p0"])
    with pytest.raises(SecAggError, match="out of order"):
        c.unmask(ids(5), [])
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.route_shares({})
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.unmask({})
    with pytest.raises(SecAggError, match="receive_masked"):
        _ = rnd.server.survivors
    bc = rnd.server.receive_keys(keys)
    c.share_keys(bc)
    with pytest.raises(SecAggError, match="out of order"):
        c.share_keys(bc)
    with pytest.raises(SecAggError, match="out of order"):
        rnd.server.receive_keys(keys)
    with pytest.raises(SecAggError, match="out of order"):
        c.unmask(ids(5), [])


def test_client_checks_on_keys_params_and_inputs():
    params = SessionParams(os.urandom(16), 3, L)
    assert SessionParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    with pytest.raises(SecAggError, match="threshold"):
        ClientSession.start(params, "a", min_threshold=4)
    with pytest.raises(SecAggError, match="threshold"):
        ClientSession.start(SessionParams(os.urandom(16), 1, L), "a")
    with pytest.raises(SecAggError, match="threshold"):
        ServerSession(SessionParams(os.urandom(16), 1, L))

    rnd, keys = start(4, 3)
    c = rnd.clients["p0"]
    swapped = dict(keys, p0={"c": keys["p0"]["c"], "s": keys["p1"]["s"]})
    with pytest.raises(SecAggError):  # own s key replaced (and now advertised twice)
        c.share_keys(swapped)
    other = ClientSession.start(rnd.params, "p0")[1]
    with pytest.raises(SecAggError, match="own public keys"):
        c.share_keys(dict(keys, p0=other))
    with pytest.raises(SecAggError, match="advertised twice"):
        c.share_keys(dict(keys, p3=dict(keys["p2"])))
    with pytest.raises(SecAggError, match="32 bytes"):
        c.share_keys(dict(keys, p3={"c": b"x", "s": keys["p3"]["s"]}))

    rnd, keys = start(4, 3)
    to_masked_ok = rnd.server.receive_keys(keys)
    sent = {u: rnd.clients[u].share_keys(to_masked_ok) for u in ids(4)}
    routed = rnd.server.route_shares(sent)
    bad = np.arange(L, dtype=np.int64) - 7
    with pytest.raises(SecAggError, match="uint64") as err:
        rnd.clients["p0"].mask(routed["p0"], bad)
    assert "-7" not in str(err.value)  # messages never quote input data
    with pytest.raises(SecAggError, match="not another member"):
        rnd.clients["p0"].mask({"p0": b"x" * 100}, rnd.inputs["p0"])


def test_tampered_or_misbound_ciphertexts_rejected():
    rnd, keys = start(5, 3)
    states = {u: c.to_bytes() for u, c in rnd.clients.items()}
    bc = rnd.server.receive_keys(keys)
    sent = {u: rnd.clients[u].share_keys(bc) for u in ids(5)}
    routed = rnd.server.route_shares(sent)

    flipped = bytearray(routed["p0"]["p1"])
    flipped[20] ^= 1
    with pytest.raises(SecAggError, match="'p1' failed authentication"):
        rnd.clients["p0"].mask(dict(routed["p0"], p1=bytes(flipped)), rnd.inputs["p0"])

    # p1's same keys used under another session id: its ciphertext does not open in this one
    state = json.loads(states["p1"])
    state["params"]["session_id"] = os.urandom(16).hex()
    elsewhere = ClientSession.from_bytes(json.dumps(state).encode()).share_keys(bc)
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
    total = rnd.server.unmask({u: rnd.clients[u].unmask(alive, dead) for u in alive})
    np.testing.assert_array_equal(total, plain_sum(list(rnd.inputs.values())))


def test_malformed_state_rejected():
    with pytest.raises(SecAggError):
        ClientSession.from_bytes(b"not json")
    rnd, _ = start(4, 3)
    state = json.loads(rnd.clients["p0"].to_bytes())
    state["stage"] = "shared"  # claims a stage whose secrets it lacks
    with pytest.raises(SecAggError, match="incomplete"):
        ClientSession.from_bytes(json.dumps(state).encode())


def test_a_low_order_mask_key_is_refused_when_shares_are_made_before_any_input_exists():
    """A mask key that cannot agree would otherwise fail only at masking, after the device trained and paid."""
    params = SessionParams(session_id=os.urandom(16), threshold=3, vector_length=L)
    sessions = {u: ClientSession.start(params, u) for u in ids(4)}
    keys = {u: pub for u, (_, pub) in sessions.items()}
    keys["p3"] = {"c": keys["p3"]["c"], "s": bytes(32)}  # the all-zero point has low order
    with pytest.raises(SecAggError, match="key agreement failed"):
        sessions["p0"][0].share_keys(keys)

"""A malicious server against the real device code (shared/secagg.py ClientSession): one test per attack.

The server here does not use ServerSession: it forges, splits and replays messages at will, holds the state of
the colluding members it controls, and lacks only the enrolment authority's private key (the device pins the
authority's public key itself). Each attack worked on the previous protocol (unsigned key advertisements, a
device bound of 2t > |U1| alone, unmask answered for whatever survivor view the server stated); each docstring
says how. Small t, n and vectors: the properties do not depend on size, and Shamir is slow at large t.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from fedrec.shared import secagg
from fedrec.shared.identity import Authority, DeviceIdentity
from fedrec.shared.secagg import ClientSession, SecAggError, SessionParams

L = 8
U64 = np.uint64
AUTHORITY = Authority.create()  # the enrolment authority: the server never holds its private key
PIN = AUTHORITY.key.public_key()  # what every device pinned in its own settings
ROGUE = Authority.create()  # the server's own "authority", which no device pinned


def names(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


@functools.cache
def identity(pid: str) -> DeviceIdentity:
    return DeviceIdentity.enrol(pid, AUTHORITY)


def params(t: int = 4, c: int = 1, **kw) -> SessionParams:
    fields = {"session_id": os.urandom(16), "threshold": t, "vector_length": L, "colluders": c,
              "server_round": 5, "plan_digest": b"\x11" * 32, **kw}
    return SessionParams(**fields)


def x25519() -> tuple[bytes, bytes]:
    sk = X25519PrivateKey.generate().private_bytes_raw()
    return sk, secagg._public(sk)


def advert(p: SessionParams, pid: str, c_pk: bytes, s_pk: bytes, *, cert: bytes,
           signer: Ed25519PrivateKey) -> dict[str, bytes]:
    """A key advertisement for `pid` over `p`, with whatever certificate and signing key the forger has."""
    keys = {"c": c_pk, "s": s_pk}
    return {**keys, "cert": cert, "sig": signer.sign(secagg._advert_message(p, pid, keys))}


def assert_refused_before_sharing(session: ClientSession, adverts: dict, match: str) -> None:
    """share_keys raises, returns nothing, and the device keeps no share, seed or U1: no ciphertext left it."""
    out = None
    with pytest.raises(SecAggError, match=match):
        out = session.share_keys(adverts, PIN)
    assert out is None and session.stage == "keys"
    state = json.loads(session.to_bytes())
    assert state["held"] is None and state["b"] is None and state["u1"] is None


def peek(session: ClientSession) -> dict:
    """What a colluding member hands the server: its whole state."""
    return json.loads(session.to_bytes())


def honest_start(p: SessionParams, members: list[str]) -> tuple[dict[str, ClientSession], dict[str, dict]]:
    sessions, adverts = {}, {}
    for u in members:
        sessions[u], adverts[u] = ClientSession.start(p, identity(u))
    return sessions, adverts


def to_masked(p: SessionParams, members: list[str]) -> tuple[dict[str, ClientSession], dict[str, dict],
                                                             dict[str, bytes]]:
    """Every member honest through masking (the server relays faithfully up to there). Returns the sessions,
    the adverts, and each member's self-mask seed b (peeked by the test, to check what the server recovers)."""
    sessions, adverts = honest_start(p, members)
    sent = {u: sessions[u].share_keys(adverts, PIN) for u in members}
    b_seeds = {u: bytes.fromhex(peek(sessions[u])["b"]) for u in members}
    for u in members:
        sessions[u].mask({s: sent[s][u] for s in members if s != u}, np.arange(L, dtype=U64))
    return sessions, adverts, b_seeds


def signed_view(p: SessionParams, adverts: dict, pid: str, alive: list[str], dead: list[str]) -> bytes:
    """pid's consistency signature over (p, U1, alive, dead): what a colluding member gives the server for any
    view it asks, as often as it asks (and what an honest member would give for the one view it is shown)."""
    u1 = {u: {"c": a["c"], "s": a["s"]} for u, a in adverts.items()}
    return identity(pid).sign(secagg._consistency_message(p, secagg._u1_digest(u1), sorted(alive), sorted(dead)))


# ------------------------------------------------------------------------------------ 1. forged cohort


def test_forged_cohort_with_invented_members_is_refused_before_any_ciphertext():
    """The server talks to one real device and invents every other member of U1: it generates their X25519
    keys and gives each an Ed25519 identity certified by an authority of its own.

    On the previous protocol keys were relayed unsigned, so the device encrypted its shares of b and s_sk to
    the invented members; the server decrypted them, rebuilt both secrets and read the device's input alone.
    This test shows that the same messages drain the device if it trusted the server's authority (the second
    half), and that with the pinned authority share_keys refuses before a single ciphertext leaves."""
    p = params(t=4, c=1)
    device, own = ClientSession.start(p, identity("d0"))
    snapshot = device.to_bytes()
    invented: dict[str, bytes] = {}  # fake member -> its c secret key, held by the server
    adverts = {"d0": own}
    for pid in names(5)[1:]:
        c_sk, c_pk = x25519()
        _, s_pk = x25519()
        fake = DeviceIdentity.enrol(pid, ROGUE)  # same issuer name as the real authority, another key
        adverts[pid] = advert(p, pid, c_pk, s_pk, cert=fake.certificate, signer=fake.key)
        invented[pid] = c_sk
    assert_refused_before_sharing(device, adverts, "not issued by the pinned enrolment authority")

    # Control: the very same cohort against a device that took the authority from the server (as the
    # previous protocol in effect did) gives the server both of the device's secrets.
    # (The server also re-certifies d0's own keys under its authority: that device checks its own entry too.)
    fooled = ClientSession.from_bytes(snapshot)
    fake_d0 = DeviceIdentity.enrol("d0", ROGUE)
    sent = fooled.share_keys(dict(adverts, d0=advert(p, "d0", own["c"], own["s"], cert=fake_d0.certificate,
                                                     signer=fake_d0.key)), ROGUE.key.public_key())
    s_shares, b_shares = [], []
    for pid, c_sk in invented.items():
        aead, ad = secagg._share_cipher(c_sk, own["c"], p, "d0", pid)
        plain = aead.decrypt(sent[pid][:12], sent[pid][12:], ad)
        s_shares.append(plain[:36])
        b_shares.append(plain[36:])
    s_sk = secagg._combine(s_shares, p.threshold, "s of d0")
    assert secagg._public(s_sk) == own["s"]
    assert secagg._combine(b_shares, p.threshold, "b of d0") == bytes.fromhex(peek(fooled)["b"])


def test_forged_cohort_reusing_real_certificates_is_refused():
    """Variant: the server holds the real members' certificates (they are public, relayed every round) and
    attaches them to X25519 keys of its own, signing with an Ed25519 key of its own, or replays a member's
    genuine advertisement from an earlier session (whose keys it also cannot use, but which would fill U1).

    On the previous protocol there was nothing to sign: any key under any name was taken. Now the signature
    must verify under the certified key and cover this session's tuple."""
    p = params(t=4, c=1)
    device, own = ClientSession.start(p, identity("d0"))
    substituted = {"d0": own}
    for pid in names(5)[1:]:
        _, c_pk = x25519()
        _, s_pk = x25519()
        substituted[pid] = advert(p, pid, c_pk, s_pk, cert=identity(pid).certificate,
                                  signer=Ed25519PrivateKey.generate())
    assert_refused_before_sharing(device, substituted, "not signed over this session's tuple")

    # a genuine advertisement of d1 with its keys swapped for the server's, keeping d1's signature
    _, real = honest_start(p, names(5))
    _, c_pk = x25519()
    assert_refused_before_sharing(device, dict(real, d0=own, d1=dict(real["d1"], c=c_pk)),
                                  "'d1' is not signed")

    # every other member's genuine advertisement from an earlier session, replayed in this one
    earlier = dataclasses.replace(p, session_id=os.urandom(16))
    _, old = honest_start(earlier, names(5))
    assert_refused_before_sharing(device, dict(old, d0=own), "not signed over this session's tuple")
    # ... and one genuine advert from the earlier session among otherwise fresh ones
    assert_refused_before_sharing(device, dict(real, d0=own, d3=old["d3"]), "'d3' is not signed")

    # the device refuses the forgeries but still takes part with the genuine cohort
    assert set(device.share_keys(dict(real, d0=own), PIN)) == set(names(5)[1:])


# --------------------------------------------------------------------- 2. different plans per device


@pytest.mark.parametrize("change", [
    {"plan_digest": b"\x22" * 32},  # another z, S or grid for the others
    {"colluders": 0},  # a smaller c, so a smaller noise share clears their floors
    {"threshold": 5},  # another t
    {"server_round": 6},
    {"vector_length": L + 1},
    {"session_id": b"another session id"},
], ids=["plan-digest", "colluders", "threshold", "round", "vector-length", "session"])
def test_params_differing_between_devices_are_refused(change):
    """The server gives devices d0, d1 one session tuple and d2, d3, d4 another (a different plan digest,
    c, t, round, vector length or session id), relaying everyone's advertisement to everyone.

    On the previous protocol advertisements were unsigned and carried no plan, so devices under different plans
    (e.g. a smaller z that still cleared their floors) summed together and none could tell. Now each advert is
    signed over the whole tuple, so every device refuses the others' advertisements before any share leaves."""
    pa = params(t=4, c=1)
    pb = dataclasses.replace(pa, **change)
    sa, adverts_a = honest_start(pa, names(2))
    sb, adverts_b = honest_start(pb, names(5)[2:])
    relayed = {**adverts_a, **adverts_b}
    assert_refused_before_sharing(sb["d2"], relayed, "'d[01]' is not signed over this session's tuple")
    assert_refused_before_sharing(sa["d0"], relayed, "'d[234]' is not signed over this session's tuple")

    # Re-signing is impossible without the members' keys; re-labelling A's advert as B's fails the certificate.
    relabelled = {**adverts_b, "d0": adverts_a["d1"], "d1": adverts_a["d0"]}
    assert_refused_before_sharing(sb["d2"], relabelled, "issued to 'd1', presented as 'd0'")


# --------------------------------------------------------------------------------- 3. split views


SPLITS = [({"d1", "d2"}, {"d3", "d4"}), ({"d1"}, {"d2", "d3", "d4"}), ({"d1", "d2", "d3"}, {"d4"}),
          (set(), {"d1", "d2", "d3", "d4"})]


@pytest.mark.parametrize(("group_a", "group_b"), SPLITS, ids=["2-2", "1-3", "3-1", "0-4"])
def test_split_views_at_unmask(group_a, group_b):
    """t = 4, c = 1 and |U1| = 6 (2t > |U1| + c): d5 colludes with the server (it hands over its state and signs
    any view), the victim is d0. The server tells d0 and group A that d0 is alive (they reveal shares of b_d0)
    and group B that d0 is dead (they would reveal shares of s_d0); with both, y_d0 - PRG(b_d0) + pair masks
    from s_d0 is d0's input alone.

    On the previous protocol every device answered the view it was shown, and accepted |U1| up to 2t - 1
    whatever c, so at |U1| = 2t - c the split gave the server t shares of both secrets (see
    test_u1_past_the_bound_is_refused_before_any_share for that arithmetic). Now a device reveals only after t
    members of its U1 signed its very view; a member signs one view; so the two groups need (|A| + 1 + c) +
    (|B| + c) >= 2t signers, more than the |U1| + c < 2t there are. At least one group refuses, and the server
    rebuilds at most one of b_d0 and s_d0."""
    t, victim, colluder = 4, "d0", "d5"
    p = params(t=t, c=1)
    members = names(6)
    sessions, adverts, b_seeds = to_masked(p, members)

    def view(signers: set[str], pad_from: set[str]) -> tuple[list[str], list[str]]:
        alive = set(signers) | {colluder}
        for u in sorted(pad_from):  # |alive| >= t, padded with members who never see this view
            if len(alive) >= t:
                break
            alive.add(u)
        return sorted(alive), sorted(set(members) - alive)

    view_a = view({victim} | group_a, group_b)  # d0 alive
    view_b = view(group_b, group_a)  # d0 dead
    assert victim in view_a[0] and victim in view_b[1]

    sig_a = {u: sessions[u].consistency(*view_a, identity(u)) for u in {victim} | group_a}
    sig_b = {u: sessions[u].consistency(*view_b, identity(u)) for u in group_b}
    # each group is sent every signature the server has, the colluder's over its own view
    to_a = {**sig_b, **sig_a, colluder: signed_view(p, adverts, colluder, *view_a)}
    to_b = {**sig_a, **sig_b, colluder: signed_view(p, adverts, colluder, *view_b)}

    replies, refused = {}, set()
    for group, sigs in (({victim} | group_a, to_a), (group_b, to_b)):
        for u in group:
            try:
                replies[u] = sessions[u].unmask(sigs)
            except SecAggError as err:
                assert "below threshold" in str(err)
                assert sessions[u].stage == "signed"  # refused: nothing revealed, nothing forgotten
                refused.add(u)
    # signers of each view: its group and the colluder; the bound keeps both from reaching t
    signers_a, signers_b = len({victim} | group_a) + 1, len(group_b) + 1
    assert signers_a + signers_b < 2 * t
    expected = ({victim} | group_a if signers_a < t else set()) | (group_b if signers_b < t else set())
    assert refused and refused == expected, "a group refuses as a whole: its members hold one view"

    held = peek(sessions[colluder])["held"][victim]
    b_shares = [r[victim] for u, r in replies.items() if u not in group_b] + [bytes.fromhex(held["b"])]
    s_shares = [r[victim] for u, r in replies.items() if u in group_b] + [bytes.fromhex(held["s"])]
    assert min(len(b_shares), len(s_shares)) < t
    if len(b_shares) >= t:  # the server's one win: d0 counted as alive, which is the honest outcome
        assert secagg._combine(b_shares, t, "b") == b_seeds[victim]
        with pytest.raises(SecAggError, match="fewer than threshold"):
            secagg._combine(s_shares, t, "s")
    else:
        with pytest.raises(SecAggError, match="fewer than threshold"):
            secagg._combine(b_shares, t, "b")
        if len(s_shares) >= t:
            assert secagg._public(secagg._combine(s_shares, t, "s")) == adverts[victim]["s"]


def test_consistency_signatures_replayed_or_over_another_view_are_not_counted():
    """The server tries to make up the t signatures a device needs: signatures of another session over the
    same lists, signatures over another view, one member's signature filed under another's id, and a
    colluder's signature while the view lists the colluder as dead. None counts. On the previous protocol there
    was no consistency round to fool: a device revealed for any view it was shown."""
    t = 4
    p = params(t=t, c=1)
    members = names(6)
    alive, dead = members[:5], members[5:]
    sessions, adverts, _ = to_masked(p, members)

    other = dataclasses.replace(p, session_id=os.urandom(16))
    sessions2, _, _ = to_masked(other, members)
    replayed = {u: sessions2[u].consistency(alive, dead, identity(u)) for u in alive}

    mine = sessions["d0"].consistency(alive, dead, identity("d0"))
    other_view = (members[:4], members[4:])
    over_other_view = {u: signed_view(p, adverts, u, *other_view) for u in ("d1", "d2", "d3")}

    attempts = {
        "replayed from another session": {**replayed, "d0": mine},
        "over another view": {**over_other_view, "d0": mine},
        "filed under another id": {"d0": mine, "d4": over_other_view["d1"],
                                   "d1": signed_view(p, adverts, "d5", alive, dead)},
        "from a member the view calls dead": {"d0": mine, **{u: signed_view(p, adverts, "d5", *other_view)
                                                             for u in ("d1", "d2", "d3")},
                                              "d5": signed_view(p, adverts, "d5", alive, dead)},
        "not bytes": {"d0": mine, "d1": "sig", "d2": None, "d3": 5},
    }
    for what, sigs in attempts.items():
        with pytest.raises(SecAggError, match=r"1 members of U1 signed this survivor view, below threshold 4"):
            sessions["d0"].unmask(sigs)
        assert sessions["d0"].stage == "signed", what

    # control: the real signatures over d0's view are counted, and d0 reveals
    with pytest.raises(SecAggError, match="out of order"):  # d0 signed (alive, dead): it signs no other view
        sessions["d0"].consistency(*other_view, identity("d0"))
    sigs = {u: sessions[u].consistency(alive, dead, identity(u)) for u in ("d1", "d2", "d3")}
    assert set(sessions["d0"].unmask({**sigs, "d0": mine})) == set(members)



def test_a_device_signs_only_one_view():
    """A member asked to sign a second view (the server collecting signatures for two views from the same
    honest members) refuses, also when its stored state is reloaded; on the previous protocol it answered an
    unmask request for any view until it had answered one."""
    p = params(t=4, c=1)
    members = names(6)
    sessions, _, _ = to_masked(p, members)
    d1 = sessions["d1"]
    d1.consistency(members, [], identity("d1"))
    stored = d1.to_bytes()
    with pytest.raises(SecAggError, match="out of order"):
        d1.consistency(members[:5], ["d5"], identity("d1"))
    with pytest.raises(SecAggError, match="out of order"):
        ClientSession.from_bytes(stored).consistency(members[:5], ["d5"], identity("d1"))
    assert json.loads(stored)["view"] == {"alive": members, "dead": []}


# ----------------------------------------------------------------------------------- 4. bounds on t, c, |U1|


@pytest.mark.parametrize(("t", "c", "n"), [(4, 1, 7), (4, 1, 8), (3, 0, 6), (5, 2, 8)])
def test_u1_past_the_bound_is_refused_before_any_share(t, c, n):
    """|U1| >= 2t - c, every member genuine: with c colluders the server could split the honest members in
    two groups of t - c and get t shares of both b_v and s_v. The previous protocol refused only |U1| >= 2t,
    so (4, 1, 7) and (5, 2, 8) went through there. The arithmetic of that attack, on real shares, then the
    device's refusal before any share leaves."""
    victim_secret_b, victim_secret_s = os.urandom(32), os.urandom(32)
    b_shares, s_shares = secagg._split(victim_secret_b, t, n), secagg._split(victim_secret_s, t, n)
    honest, colluders = list(range(n - c)), list(range(n - c, n))
    group_a, group_b = honest[:t - c], honest[t - c:2 * (t - c)]  # disjoint: n - c >= 2(t - c)
    assert len(group_a) == len(group_b) == t - c
    assert secagg._combine([b_shares[i] for i in group_a + colluders], t, "b") == victim_secret_b
    assert secagg._combine([s_shares[i] for i in group_b + colluders], t, "s") == victim_secret_s

    p = params(t=t, c=c)
    sessions, adverts = honest_start(p, names(n))
    assert_refused_before_sharing(sessions["d0"], adverts, rf"needs \|U1\| < 2t - c = {2 * t - c}, got {n}")


def test_threshold_and_colluders_out_of_range_are_refused():
    """c >= t would let the colluders alone (with the server) reach t; t < 2 makes a share the secret itself.
    The previous protocol had no c at all, and a t the server chose."""
    for t, c in ((3, 3), (3, 4), (2, -1)):
        with pytest.raises(SecAggError, match="colluders"):
            SessionParams(os.urandom(16), t, L, colluders=c)
    with pytest.raises(SecAggError, match="below 2"):
        ClientSession.start(params(t=1, c=0), identity("d0"))
    with pytest.raises(SecAggError, match="positive"):
        SessionParams(os.urandom(16), 0, L)
    p = params(t=4, c=1)
    sessions, adverts = honest_start(p, names(3))  # |U1| < t
    assert_refused_before_sharing(sessions["d0"], adverts, r"\|U1\| = 3 is below threshold 4")


# ------------------------------------------------------------------------------------ 5. duplicate identity


def test_duplicate_identity_is_refused():
    """One party presenting itself as several members, so that it counts several times toward t: the previous
    protocol had no identities at all, so any number of members could be one party. Now: (a) the same
    certificate under two ids fails the subject check; (b) one signing key certified under two ids (a device
    enrolled twice, a cloned device) is refused; (c) two members with the same X25519 keys are refused."""
    p = params(t=4, c=1)
    sessions, adverts = honest_start(p, names(5))
    d0 = sessions["d0"]

    # (a) d1's genuine advertisement relayed again under the id d4
    assert_refused_before_sharing(d0, dict(adverts, d4=adverts["d1"]), "issued to 'd1', presented as 'd4'")

    # (b) the key of d1 enrolled a second time as d4, with fresh X25519 keys and a valid signature
    twin = DeviceIdentity.enrol("d4", AUTHORITY, key=identity("d1").key)
    _, c_pk = x25519()
    _, s_pk = x25519()
    assert_refused_before_sharing(d0, dict(adverts, d4=advert(p, "d4", c_pk, s_pk, cert=twin.certificate,
                                                                signer=twin.key)),
                                  "one certified signing key advertises two participants")

    # (c) d4 (enrolled, colluding) advertises d1's X25519 keys as its own
    copied = advert(p, "d4", adverts["d1"]["c"], adverts["d1"]["s"], cert=identity("d4").certificate,
                    signer=identity("d4").key)
    assert_refused_before_sharing(d0, dict(adverts, d4=copied), "advertised twice")


# --------------------------------------------------------------------------------- 6. bad certificates


def _certificate(pid: str, key: Ed25519PrivateKey, before: datetime.datetime, after: datetime.datetime) -> bytes:
    """A certificate the real authority signed, with chosen validity (an old or premature enrolment)."""
    from cryptography.hazmat.primitives import serialization

    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pid)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec enrolment authority")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(before).not_valid_after(after).sign(AUTHORITY.key, algorithm=None))
    return cert.public_bytes(serialization.Encoding.DER)


def test_expired_or_misassigned_certificates_are_refused():
    """Certificates the real authority issued, but not for this member now: one expired (a retired device whose
    key the server may have obtained), one not yet valid, one issued to another device id (d9) used for d4. The
    previous protocol had no certificates, so any of these members was taken."""
    p = params(t=4, c=1)
    sessions, adverts = honest_start(p, names(4))
    d0 = sessions["d0"]
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def member(pid: str, cert_for: str, before: datetime.datetime, after: datetime.datetime) -> dict[str, bytes]:
        key = Ed25519PrivateKey.generate()
        ident = DeviceIdentity(pid, key, _certificate(cert_for, key, before, after))
        return ClientSession.start(p, ident)[1]  # a real device's code signs it: only the certificate is off

    expired = DeviceIdentity("d4", (k := Ed25519PrivateKey.generate()),
                             AUTHORITY.issue("d4", k.public_key(), valid_for=datetime.timedelta(minutes=-1)))
    assert_refused_before_sharing(d0, dict(adverts, d4=ClientSession.start(p, expired)[1]), "outside its validity")
    assert_refused_before_sharing(d0, dict(adverts, d4=member("d4", "d4", now - 2 * day, now - day)),
                                  "outside its validity")
    assert_refused_before_sharing(d0, dict(adverts, d4=member("d4", "d4", now + day, now + 2 * day)),
                                  "outside its validity")
    assert_refused_before_sharing(d0, dict(adverts, d4=member("d4", "d9", now - day, now + day)),
                                  "issued to 'd9', presented as 'd4'")
    # control: the same construction with a valid certificate for d4 is taken
    assert set(d0.share_keys(dict(adverts, d4=member("d4", "d4", now - day, now + day)), PIN)) == \
        {"d1", "d2", "d3", "d4"}

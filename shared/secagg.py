"""Secure aggregation (Bonawitz et al., CCS 2017) on a complete graph, actively secure: sums of uint64 vectors
modulo 2**64 that a malicious server can decrypt only over at least t members, t - c of them honest.

Client u sends y_u = x_u + PRG(b_u) + sum over v in U2 minus u of +-PRG(s_uv) mod 2**64, with b_u a fresh 256-bit
seed, s_uv an HKDF key over X25519 of the "s" keys of u and v, and ChaCha20 as PRG: alone, y_u looks uniform.
Pairwise masks cancel in the sum; b_u and u's s key are Shamir-shared (threshold t) to all of U1, encrypted
pairwise. Against a malicious server (docs/privacy.md has the argument):
- every member signs its key advertisement with its enrolled long-term key (shared/identity.py) over the whole
  session: (session id, round, its id, both keys, t, c, vector length, plan digest); a client shares only with
  members whose certificate chains to the authority it pinned and whose signature covers the very tuple it
  holds, so the server can neither invent members nor give members different t, c or plans;
- a client refuses |U1| >= 2t - c (and c >= t) on its own view;
- consistency round: before unmasking, each survivor signs (tuple, hash of its U1, the alive and dead lists it
  is told); a client reveals shares only after verifying at least t such signatures from members of its own U1
  over the same values, and reveals, per participant, the share of b (alive) or of s_sk (dead), never both,
  once. With c colluders two disjoint honest groups cannot both reach t when 2t > |U1| + c, so all honest
  revealers hold one view, and any sum the server decrypts holds at least t - c honest inputs.
Answer-once holds per live state: a kept older `to_bytes` snapshot could be replayed, so store only the newest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import DeviceIdentity, IdentityError, certificate_key, verify_certificate, verify_signature

try:  # the field Shamir works in, to reuse Lagrange weights (see _combine)
    from Crypto.Protocol.SecretSharing import _Element as _GF
except ImportError:  # pragma: no cover
    _GF = None

__all__ = ["Advert", "ClientSession", "SecAggError", "ServerSession", "SessionParams"]

_LABEL = b"fedrec-secagg/v2"
_STATE_FORMAT = "fedrec-secagg-client/2"
_KEY_LEN = 32
_PRG_NONCE = bytes(16)  # fixed: every PRG key is derived for exactly one stream
_AEAD_NONCE_LEN = 12
_HALF = 16  # pycryptodome's Shamir shares 16-byte secrets
_SHARE_LEN = 4 + 2 * _HALF  # big-endian index + the shares of the two halves
_PLAINTEXT_LEN = 2 * _SHARE_LEN  # s_sk share then b share
_MAX_ID_LEN = 256
_KEY_NAMES = ("c", "s")
_MAX_PARAM = 2**63  # every integer of the session tuple is framed as 8 bytes

# Client stages, in order; "done" means the unmask request was answered.
_KEYS, _SHARED, _RECEIVED, _MASKED, _SIGNED, _DONE = "keys", "shared", "received", "masked", "signed", "done"
_STAGES = (_KEYS, _SHARED, _RECEIVED, _MASKED, _SIGNED, _DONE)
_ADVERT_FIELDS = ("c", "s", "cert", "sig")

PublicKeys = dict[str, bytes]
Advert = dict[str, bytes]  # "c", "s": X25519 public keys; "cert": the member's certificate (DER); "sig": Ed25519


class SecAggError(ValueError):
    """A protocol check failed; the message names the check and never quotes input vectors."""


@dataclass(frozen=True)
class SessionParams:
    """What every participant of one round attempt agrees on; all of it is signed into every advertisement."""

    session_id: bytes  # unique per round attempt; bound into every KDF and AEAD
    threshold: int  # t: shares needed to reconstruct; also the least number of inputs in any decryptable sum
    vector_length: int  # number of uint64 entries summed
    colluders: int = 0  # c: members assumed to collude with the server (their noise shares may be removed)
    server_round: int = 0
    plan_digest: bytes = bytes(32)  # SHA-256 of the plan every member accounts with (z, S, the grid, ...)

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, bytes) or not self.session_id:
            raise SecAggError("session_id must be non-empty bytes")
        for name in ("threshold", "vector_length", "colluders", "server_round"):
            value = getattr(self, name)
            if _is_int(value) and not -_MAX_PARAM <= value < _MAX_PARAM:
                raise SecAggError(f"{name} {value} is out of range")
        if not _is_int(self.threshold) or self.threshold < 1:
            raise SecAggError("threshold must be a positive integer")
        if not _is_int(self.vector_length) or self.vector_length < 1:
            raise SecAggError("vector_length must be a positive integer")
        if not _is_int(self.colluders) or not 0 <= self.colluders < self.threshold:
            raise SecAggError("colluders must be an integer with 0 <= c < t")
        if not _is_int(self.server_round) or self.server_round < 0:
            raise SecAggError("server_round must be a non-negative integer")
        if not isinstance(self.plan_digest, bytes) or len(self.plan_digest) != 32:
            raise SecAggError("plan_digest must be 32 bytes")

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id.hex(), "threshold": self.threshold,
                "vector_length": self.vector_length, "colluders": self.colluders,
                "server_round": self.server_round, "plan_digest": self.plan_digest.hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionParams:
        try:
            return cls(session_id=bytes.fromhex(d["session_id"]), threshold=d["threshold"],
                       vector_length=d["vector_length"], colluders=d["colluders"], server_round=d["server_round"],
                       plan_digest=bytes.fromhex(d["plan_digest"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SecAggError):
                raise
            raise SecAggError("malformed session params") from None


# --------------------------------------------------------------------------------------------- primitives


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _frame(*parts: bytes) -> bytes:
    """Length-prefix every field, so distinct tuples never encode to the same KDF info or AD."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _hkdf(ikm: bytes, *info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=None, info=_frame(_LABEL, *info)).derive(ikm)


def _prg(key: bytes, length: int) -> np.ndarray:
    """`length` uint64 words of ChaCha20 keystream: full 256-bit key, no Python loop over entries."""
    if len(key) != _KEY_LEN:
        raise SecAggError("PRG key must be 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def _self_mask_key(b: bytes, session_id: bytes) -> bytes:
    return _hkdf(b, b"self-mask", session_id)


def _exchange(sk: bytes, pk: bytes, what: str) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:  # low-order point: the shared secret would be all zero
        raise SecAggError(f"X25519 key agreement failed for {what}") from None


def _pair_mask_key(s_sk: bytes, other_s_pk: bytes, session_id: bytes, u: str, v: str) -> bytes:
    lo, hi = sorted((u, v))
    shared = _exchange(s_sk, other_s_pk, f"the pair mask of {lo!r} and {hi!r}")
    return _hkdf(shared, b"pair-mask", session_id, lo.encode(), hi.encode())


def _pair_mask(s_sk: bytes, other_s_pk: bytes, params: SessionParams, u: str, v: str) -> np.ndarray:
    return _prg(_pair_mask_key(s_sk, other_s_pk, params.session_id, u, v), params.vector_length)


def _params_context(params: SessionParams) -> bytes:
    return _frame(params.session_id, struct.pack(">QQQQ", params.threshold, params.vector_length, params.colluders,
                                                 params.server_round), params.plan_digest)


def _advert_message(params: SessionParams, pid: str, keys: PublicKeys) -> bytes:
    """What a member signs to advertise its keys: the whole session tuple, its id and both keys."""
    return _frame(_LABEL, b"advert", _params_context(params), pid.encode(), keys["c"], keys["s"])


def _u1_digest(u1: dict[str, PublicKeys]) -> bytes:
    return hashlib.sha256(_frame(*(_frame(p.encode(), u1[p]["c"], u1[p]["s"]) for p in sorted(u1)))).digest()


def _consistency_message(params: SessionParams, u1_digest: bytes, alive: list[str], dead: list[str]) -> bytes:
    """What a survivor signs in the consistency round: the session, its U1 and the survivor view it was told."""
    return _frame(_LABEL, b"consistency", _params_context(params), u1_digest,
                  _frame(*(p.encode() for p in sorted(alive))), _frame(*(p.encode() for p in sorted(dead))))


def _share_cipher(c_sk: bytes, other_c_pk: bytes, params: SessionParams, sender: str,
                  recipient: str) -> tuple[ChaCha20Poly1305, bytes]:
    """AEAD for sender -> recipient: the key is per direction and the AD binds session, sender and recipient."""
    shared = _exchange(c_sk, other_c_pk, f"share encryption from {sender!r} to {recipient!r}")
    key = _hkdf(shared, b"share-enc", params.session_id, sender.encode(), recipient.encode())
    ad = _frame(_LABEL, b"share-ad", _params_context(params), sender.encode(), recipient.encode())
    return ChaCha20Poly1305(key), ad


def _split(secret: bytes, t: int, n: int) -> list[bytes]:
    """Shares of a 32-byte secret for indices 1..n; both halves of one recipient use the same index."""
    lo = Shamir.split(t, n, secret[:_HALF])
    hi = Shamir.split(t, n, secret[_HALF:])
    assert [i for i, _ in lo] == [j for j, _ in hi] == list(range(1, n + 1))
    return [struct.pack(">I", i) + a + b for (i, a), (_, b) in zip(lo, hi, strict=True)]


def _parse_share(share: object, what: str) -> tuple[int, bytes, bytes]:
    if not isinstance(share, bytes) or len(share) != _SHARE_LEN:
        raise SecAggError(f"malformed share for {what}")
    (index,) = struct.unpack(">I", share[:4])
    if index < 1:
        raise SecAggError(f"malformed share index for {what}")
    return index, share[4:4 + _HALF], share[4 + _HALF:]


def _combine(shares: list[bytes], t: int, what: str) -> bytes:
    parsed = sorted((_parse_share(s, what) for s in shares), key=lambda p: p[0])
    if len({p[0] for p in parsed}) != len(parsed):
        raise SecAggError(f"duplicate share index for {what}")
    if len(parsed) < t:
        raise SecAggError(f"fewer than threshold shares for {what}")
    use = parsed[:t]  # exactly t points fix the degree t-1 polynomial; more would only cost time
    if _GF is None:
        return Shamir.combine([(i, a) for i, a, _ in use]) + Shamir.combine([(i, b) for i, _, b in use])
    coeffs = _lagrange_at_zero(tuple(i for i, _, _ in use))
    return _interpolate([a for _, a, _ in use], coeffs) + _interpolate([b for _, _, b in use], coeffs)


# Shamir.combine recomputes the Lagrange weights (t^2 products, t inversions) for every secret; the server
# combines 2 halves of one secret per participant, mostly over the same t responders, so it computes the
# weights once per index set with pycryptodome's own GF(2^128) element (_GF; plain Shamir.combine if it moves).
@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[Any, ...]:
    """Weights l_j(0) = prod_{m != j} x_m / (x_j - x_m); in characteristic 2, minus is plus."""
    assert _GF is not None
    xs = [_GF(i) for i in indices]
    weights = []
    for j, x_j in enumerate(xs):
        num, den = _GF(1), _GF(1)
        for m, x_m in enumerate(xs):
            if m != j:
                num, den = num * x_m, den * (x_j + x_m)
        weights.append(num * den.inverse())
    return tuple(weights)


def _interpolate(values: list[bytes], weights: tuple[Any, ...]) -> bytes:
    assert _GF is not None
    acc = _GF(0)
    for y, w in zip(values, weights, strict=True):
        acc = acc + _GF(y) * w
    return acc.encode()


def _public(sk: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()


def _check_id(pid: object, what: str) -> str:
    if not isinstance(pid, str) or not pid or len(pid) > _MAX_ID_LEN:
        raise SecAggError(f"invalid participant id in {what}")
    try:
        pid.encode()
    except UnicodeEncodeError:
        raise SecAggError(f"invalid participant id in {what}") from None
    return pid


def _check_id_list(ids: object, what: str) -> list[str]:
    if not isinstance(ids, (list, tuple)):
        raise SecAggError(f"{what} must be a list of participant ids")
    out = [_check_id(p, what) for p in ids]
    if len(set(out)) != len(out):
        raise SecAggError(f"duplicate participant id in {what}")
    return out


def _check_keys(keys: object) -> dict[str, PublicKeys]:
    """U1's advertised keys: ids valid, exactly a 32-byte "c" and "s" each, no key advertised twice."""
    if not isinstance(keys, dict):
        raise SecAggError("key list must map participant id to its public keys")
    out: dict[str, PublicKeys] = {}
    seen: set[bytes] = set()
    for pid in sorted(_check_id_list(list(keys), "key list")):
        entry = keys[pid]
        if not isinstance(entry, dict) or set(entry) != set(_KEY_NAMES):
            raise SecAggError(f"public keys of {pid!r} must be exactly 'c' and 's'")
        for name in _KEY_NAMES:
            value = entry[name]
            if not isinstance(value, bytes) or len(value) != _KEY_LEN:
                raise SecAggError(f"public key {name!r} of {pid!r} must be 32 bytes")
            # A repeated key means a reflected or substituted key: refuse rather than mask against it.
            if value in seen:
                raise SecAggError(f"public key {name!r} of {pid!r} is advertised twice")
            seen.add(value)
        out[pid] = {name: entry[name] for name in _KEY_NAMES}
    return out


def _check_vector(vector: object, length: int, what: str) -> np.ndarray:
    # Strict dtype: silently casting floats or negative ints would change the sum.
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.shape != (length,):
        raise SecAggError(f"{what} must be a uint64 array of shape ({length},)")
    return vector


def _check_adverts(adverts: object, params: SessionParams, authority: Any | None) -> tuple[dict[str, PublicKeys],
                                                                                         dict[str, bytes]]:
    """U1's signed advertisements -> (their X25519 keys, their certified Ed25519 keys).

    Each must carry exactly c, s, cert and sig; its certificate must name the member (and chain to `authority`
    where given: the device's pinned key; the server passes None and checks only the form); its signature must
    cover this very session tuple; no key, and no signing key, may appear twice.
    """
    if not isinstance(adverts, dict):
        raise SecAggError("advertisements must map participant id to its signed keys")
    keys: dict[str, dict[str, bytes]] = {}
    signing: dict[str, bytes] = {}
    for pid in _check_id_list(list(adverts), "advertisements"):
        entry = adverts[pid]
        if not isinstance(entry, dict) or set(entry) != set(_ADVERT_FIELDS) or \
                not all(isinstance(entry[f], bytes) for f in _ADVERT_FIELDS):
            raise SecAggError(f"the advertisement of {pid!r} must hold bytes under exactly {list(_ADVERT_FIELDS)}")
        keys[pid] = {name: entry[name] for name in _KEY_NAMES}
        signing[pid] = _certified_key(entry["cert"], pid, authority)
    u1 = _check_keys(keys)
    if len(set(signing.values())) != len(signing):
        raise SecAggError("one certified signing key advertises two participants")
    for pid in u1:
        if not verify_signature(signing[pid], adverts[pid]["sig"], _advert_message(params, pid, u1[pid])):
            raise SecAggError(f"the advertisement of {pid!r} is not signed over this session's tuple "
                              "(session, round, t, c, vector length, plan)")
    return u1, signing


def _certified_key(certificate: bytes, pid: str, authority: Any | None) -> bytes:
    try:
        if authority is not None:
            return verify_certificate(certificate, authority, pid, what=f"the certificate of {pid!r}")
        return certificate_key(certificate, pid, what=f"the certificate of {pid!r}")
    except IdentityError as err:
        raise SecAggError(str(err)) from None


# ------------------------------------------------------------------------------------------------ client


class ClientSession:
    """One participant's side; serialisable between stages (each stage may run in a fresh process).

    The long-term identity (signing key) and the pinned authority are passed to the stages that need them and
    never stored in the session.
    """

    def __init__(self, *, params: SessionParams, my_id: str, stage: str, c_sk: bytes | None, s_sk: bytes | None,
                 b: bytes | None, u1: dict[str, PublicKeys] | None, signers: dict[str, bytes] | None,
                 u2: list[str] | None, held: dict[str, dict[str, bytes]] | None,
                 view: dict[str, list[str]] | None) -> None:
        # Private: use start() or from_bytes().
        self._params = params
        self._my_id = my_id
        self._stage = stage
        self._c_sk = c_sk
        self._s_sk = s_sk
        self._b = b
        self._u1 = u1
        self._signers = signers  # member id -> its certified Ed25519 key (raw)
        self._u2 = u2
        self._held = held  # participant id -> {"s": share, "b": share} held for it (mine included)
        self._view = view  # {"alive": [...], "dead": [...]}: the survivor view it signed

    @classmethod
    def start(cls, params: SessionParams, identity: DeviceIdentity) -> tuple[ClientSession, Advert]:
        """Fresh keys for this session and their advertisement, signed with the device's enrolled key."""
        if not isinstance(params, SessionParams):
            raise SecAggError("params must be SessionParams")
        my_id = _check_id(identity.device_id, "my_id")
        cls._check_threshold(params)
        c_sk = X25519PrivateKey.generate().private_bytes_raw()
        s_sk = X25519PrivateKey.generate().private_bytes_raw()
        session = cls(params=params, my_id=my_id, stage=_KEYS, c_sk=c_sk, s_sk=s_sk, b=None, u1=None, signers=None,
                      u2=None, held=None, view=None)
        keys = session._public_keys()
        advert = {**keys, "cert": identity.certificate, "sig": identity.sign(_advert_message(params, my_id, keys))}
        return session, advert

    @staticmethod
    def _check_threshold(params: SessionParams) -> None:
        if params.threshold < 2:
            raise SecAggError(f"threshold {params.threshold} is below 2")

    @property
    def params(self) -> SessionParams:
        return self._params

    @property
    def my_id(self) -> str:
        return self._my_id

    @property
    def stage(self) -> str:
        return self._stage

    def _public_keys(self) -> dict[str, bytes]:
        assert self._c_sk is not None and self._s_sk is not None
        return {"c": _public(self._c_sk), "s": _public(self._s_sk)}

    def _require(self, stage: str, step: str) -> None:
        if self._stage == _DONE and step == "unmask":
            raise SecAggError("unmask request already answered for this session")
        if self._stage != stage:
            raise SecAggError(f"{step} called out of order (stage is {self._stage!r}, needs {stage!r})")

    def share_keys(self, adverts: dict[str, Advert], authority: Any) -> dict[str, bytes]:
        """Verify U1's advertisements against the pinned `authority` (an Ed25519 public key), check |U1| against
        t and c, then Shamir-share b and s_sk over U1 and encrypt each member's shares to it."""
        self._require(_KEYS, "share_keys")
        if authority is None:
            raise SecAggError("no pinned enrolment authority: a secure sum needs one")
        if isinstance(authority, bytes):
            try:
                authority = Ed25519PublicKey.from_public_bytes(authority)
            except ValueError:
                raise SecAggError("the pinned enrolment authority is not an Ed25519 public key") from None
        if not isinstance(authority, Ed25519PublicKey):
            raise SecAggError("the pinned enrolment authority must be an Ed25519 public key")
        u1, signers = _check_adverts(adverts, self._params, authority)
        if u1.get(self._my_id) != self._public_keys():
            raise SecAggError("own public keys missing or altered in the key list")
        t, c = self._params.threshold, self._params.colluders
        if len(u1) < t:
            raise SecAggError(f"|U1| = {len(u1)} is below threshold {t}")
        if 2 * t <= len(u1) + c:
            # Two disjoint groups of honest members, each with c colluders, could each reach t and reveal a
            # different view (one member alive to one group, dead to the other) unless 2t > |U1| + c.
            raise SecAggError(f"threshold {t} with {c} colluders needs |U1| < 2t - c = {2 * t - c}, got {len(u1)}")
        assert self._c_sk is not None and self._s_sk is not None
        for v in u1:  # every mask key must agree now: one that fails later would fail after the data was read
            if v != self._my_id:
                _exchange(self._s_sk, u1[v]["s"], f"the pair mask with {v!r}")
        order = sorted(u1)  # share index = 1 + position in sorted U1
        b = os.urandom(_KEY_LEN)
        s_shares = _split(self._s_sk, t, len(order))
        b_shares = _split(b, t, len(order))
        out: dict[str, bytes] = {}
        held: dict[str, dict[str, bytes]] = {}
        for pos, v in enumerate(order):
            if v == self._my_id:
                held[v] = {"s": s_shares[pos], "b": b_shares[pos]}
                continue
            aead, ad = _share_cipher(self._c_sk, u1[v]["c"], self._params, self._my_id, v)
            nonce = os.urandom(_AEAD_NONCE_LEN)  # the key is single-use already; a random nonce costs nothing
            out[v] = nonce + aead.encrypt(nonce, s_shares[pos] + b_shares[pos], ad)
        self._u1, self._signers, self._b, self._held, self._stage = u1, signers, b, held, _SHARED
        return out

    def mask(self, ciphertexts: dict[str, bytes], vector: np.ndarray) -> np.ndarray:
        """Decrypt the shares addressed to me (U2 = their senders and me) and mask `vector` against U2."""
        _check_vector(vector, self._params.vector_length, "input vector")
        self.receive_shares(ciphertexts)
        return self.mask_input(vector)

    def receive_shares(self, ciphertexts: dict[str, bytes]) -> None:
        """Check and decrypt the shares addressed to me; fix U2. Done before the input exists, so that a device
        reads its data and trains only for a round whose shares it has verified, and only once."""
        self._require(_SHARED, "receive_shares")
        assert self._u1 is not None and self._held is not None and self._b is not None
        assert self._c_sk is not None and self._s_sk is not None
        params = self._params
        if not isinstance(ciphertexts, dict):
            raise SecAggError("ciphertexts must map sender id to ciphertext")
        for sender in ciphertexts:
            _check_id(sender, "ciphertexts")
            if sender == self._my_id or sender not in self._u1:
                raise SecAggError(f"ciphertext from {sender!r}, who is not another member of U1")
        u2 = sorted(set(ciphertexts) | {self._my_id})
        if len(u2) < params.threshold:
            raise SecAggError(f"|U2| = {len(u2)} is below threshold {params.threshold}")
        my_index = sorted(self._u1).index(self._my_id) + 1
        held = {self._my_id: self._held[self._my_id]}
        for sender, ct in ciphertexts.items():
            if not isinstance(ct, bytes) or len(ct) <= _AEAD_NONCE_LEN:
                raise SecAggError(f"malformed ciphertext from {sender!r}")
            aead, ad = _share_cipher(self._c_sk, self._u1[sender]["c"], params, sender, self._my_id)
            try:
                plain = aead.decrypt(ct[:_AEAD_NONCE_LEN], ct[_AEAD_NONCE_LEN:], ad)
            except InvalidTag:
                raise SecAggError(f"ciphertext from {sender!r} failed authentication") from None
            if len(plain) != _PLAINTEXT_LEN:
                raise SecAggError(f"malformed share plaintext from {sender!r}")
            s_share, b_share = plain[:_SHARE_LEN], plain[_SHARE_LEN:]
            for share in (s_share, b_share):
                if _parse_share(share, sender)[0] != my_index:
                    raise SecAggError(f"share from {sender!r} carries the wrong index")
            held[sender] = {"s": s_share, "b": b_share}
        self._u2, self._held, self._stage = u2, held, _RECEIVED

    def mask_input(self, vector: np.ndarray) -> np.ndarray:
        """Mask `vector` against U2 (after receive_shares), once."""
        self._require(_RECEIVED, "mask")
        assert self._u1 is not None and self._u2 is not None and self._b is not None and self._s_sk is not None
        params, u2 = self._params, self._u2
        _check_vector(vector, params.vector_length, "input vector")
        masked = vector.copy()
        masked += _prg(_self_mask_key(self._b, params.session_id), params.vector_length)
        for v in u2:
            if v == self._my_id:
                continue
            pair = _pair_mask(self._s_sk, self._u1[v]["s"], params, self._my_id, v)
            if self._my_id < v:
                masked += pair
            else:
                masked -= pair
        # b is shared and used; keeping it would only enlarge what a stolen state reveals.
        self._b, self._stage = None, _MASKED
        return masked

    def consistency(self, alive: list[str], dead: list[str], identity: DeviceIdentity) -> bytes:
        """Check the survivor view the server tells (alive: U3, dead: U2 minus U3) and sign it, once: the
        signature binds the session, this member's U1 and the view, and nothing is revealed yet."""
        self._require(_MASKED, "consistency")
        assert self._u2 is not None and self._u1 is not None
        if identity.device_id != self._my_id:
            raise SecAggError("the signing identity is not this session's member")
        alive_l = _check_id_list(alive, "alive list")
        dead_l = _check_id_list(dead, "dead list")
        if set(alive_l) & set(dead_l):
            raise SecAggError("alive and dead lists overlap")
        if set(alive_l) | set(dead_l) != set(self._u2):
            raise SecAggError("alive and dead lists must partition U2")
        if len(alive_l) < self._params.threshold:
            raise SecAggError(f"|alive| = {len(alive_l)} is below threshold {self._params.threshold}")
        if self._my_id not in alive_l:
            raise SecAggError("this client is not in the alive list")
        view = {"alive": sorted(alive_l), "dead": sorted(dead_l)}
        signature = identity.sign(_consistency_message(self._params, _u1_digest(self._u1), view["alive"],
                                                       view["dead"]))
        self._view, self._stage = view, _SIGNED
        return signature

    def unmask(self, signatures: dict[str, bytes]) -> dict[str, bytes]:
        """Reveal b-shares of the alive and s_sk-shares of the dead of the view it signed (never both for one
        node), once, and only after at least t members of its own U1 signed that same view."""
        self._require(_SIGNED, "unmask")
        assert self._held is not None and self._view is not None and self._signers is not None
        assert self._u1 is not None
        if not isinstance(signatures, dict):
            raise SecAggError("consistency signatures must map signer id to signature")
        message = _consistency_message(self._params, _u1_digest(self._u1), self._view["alive"], self._view["dead"])
        alive = set(self._view["alive"])
        valid = {signer for signer, sig in signatures.items()
                 if isinstance(signer, str) and signer in alive and isinstance(sig, bytes)
                 and verify_signature(self._signers[signer], sig, message)}
        if len(valid) < self._params.threshold:
            raise SecAggError(f"{len(valid)} members of U1 signed this survivor view, below threshold "
                              f"{self._params.threshold}: the server may be showing members different views")
        reply = {v: self._held[v]["b"] for v in self._view["alive"]}
        reply.update({v: self._held[v]["s"] for v in self._view["dead"]})
        # Answer once: forget every secret so this state can reveal nothing further.
        self._stage, self._held, self._c_sk, self._s_sk, self._b = _DONE, None, None, None, None
        return reply

    # ------------------------------------------------------------------------------------- serialisation

    def to_bytes(self) -> bytes:
        """The full private state as JSON (bytes as hex); keep it as secret as the keys it holds."""
        def hx(x: bytes | None) -> str | None:
            return None if x is None else x.hex()

        state = {
            "format": _STATE_FORMAT, "params": self._params.to_dict(), "my_id": self._my_id,
            "stage": self._stage, "c_sk": hx(self._c_sk), "s_sk": hx(self._s_sk), "b": hx(self._b),
            "u1": None if self._u1 is None else {p: {k: v.hex() for k, v in e.items()} for p, e in self._u1.items()},
            "signers": None if self._signers is None else {p: k.hex() for p, k in self._signers.items()},
            "u2": self._u2, "view": self._view,
            "held": None if self._held is None else {p: {k: v.hex() for k, v in e.items()}
                                                     for p, e in self._held.items()},
        }
        return json.dumps(state, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientSession:
        try:
            state = json.loads(data)
            if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
                raise SecAggError("unknown client state format")
            params = SessionParams.from_dict(state["params"])
            stage = state["stage"]
            if stage not in _STAGES:
                raise SecAggError("unknown client stage")

            def unhex(x: Any, size: int | None = None) -> bytes | None:
                if x is None:
                    return None
                raw = bytes.fromhex(x)
                if size is not None and len(raw) != size:
                    raise SecAggError("malformed key in client state")
                return raw

            u1 = None if state["u1"] is None else _check_keys(
                {p: {k: bytes.fromhex(v) for k, v in e.items()} for p, e in state["u1"].items()})
            signers = None if state["signers"] is None else {
                _check_id(p, "stored signers"): unhex(k, _KEY_LEN) for p, k in state["signers"].items()}
            u2 = None if state["u2"] is None else _check_id_list(state["u2"], "stored U2")
            view = None if state["view"] is None else {
                "alive": _check_id_list(state["view"]["alive"], "stored view"),
                "dead": _check_id_list(state["view"]["dead"], "stored view")}
            held = None if state["held"] is None else {
                _check_id(p, "stored shares"): {k: unhex(e[k], _SHARE_LEN) for k in ("s", "b")}
                for p, e in state["held"].items()}
            session = cls(params=params, my_id=_check_id(state["my_id"], "stored id"), stage=stage,
                          c_sk=unhex(state["c_sk"], _KEY_LEN), s_sk=unhex(state["s_sk"], _KEY_LEN),
                          b=unhex(state["b"], _KEY_LEN), u1=u1, signers=signers, u2=u2,  # type: ignore[arg-type]
                          held=held, view=view)  # type: ignore[arg-type]
        except SecAggError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecAggError("malformed client state") from None
        cls._check_threshold(params)
        # Each stage needs exactly its secrets; a state missing them cannot be resumed.
        needs = {_KEYS: ("c_sk", "s_sk"), _SHARED: ("c_sk", "s_sk", "b", "u1", "signers", "held"),
                 _RECEIVED: ("s_sk", "b", "u1", "signers", "u2", "held"),
                 _MASKED: ("u1", "signers", "u2", "held"),
                 _SIGNED: ("u1", "signers", "u2", "held", "view"), _DONE: ()}[stage]
        if any(getattr(session, "_" + name) is None for name in needs):
            raise SecAggError(f"client state for stage {stage!r} is incomplete")
        return session


# ------------------------------------------------------------------------------------------------ server


class ServerSession:
    """The aggregator's side: collects, routes, and reconstructs the sum of the survivors' inputs."""

    def __init__(self, params: SessionParams) -> None:
        if not isinstance(params, SessionParams):
            raise SecAggError("params must be SessionParams")
        if params.threshold < 2:
            raise SecAggError("threshold must be at least 2")
        self._params = params
        self._stage = "keys"
        self._u1: dict[str, PublicKeys] = {}
        self._signers: dict[str, bytes] = {}
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._u4: list[str] = []
        self._dead: list[str] = []
        self._total: np.ndarray | None = None

    def _require(self, stage: str, step: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"{step} called out of order (stage is {self._stage!r}, needs {stage!r})")

    def receive_keys(self, adverts: dict[str, Advert]) -> tuple[dict[str, Advert], dict[str, str]]:
        """U1: the advertisements that are well formed and signed over this session by their certificate's key
        (each device also checks the authority). Returns (U1's advertisements to relay, excluded id -> why)."""
        self._require("keys", "receive_keys")
        if not isinstance(adverts, dict):
            raise SecAggError("advertisements must map participant id to its signed keys")
        kept: dict[str, Advert] = {}
        excluded: dict[str, str] = {}
        owners: dict[bytes, list[str]] = {}  # every key (X25519 or signing) -> the members advertising it
        for pid, advert in adverts.items():
            try:
                _, signing = _check_adverts({pid: advert}, self._params, None)
                kept[pid] = advert
                for key in (advert["c"], advert["s"], signing[pid]):
                    owners.setdefault(key, []).append(pid)
            except SecAggError as err:
                excluded[str(pid)] = str(err)
        # A key advertised by two members would make every device refuse the list: leave all of them out (which of
        # them copied it is unknowable here), so one bad advertisement cannot stop the round.
        for members in owners.values():
            for pid in members if len(members) > 1 else ():
                if kept.pop(pid, None) is not None:
                    excluded[pid] = "a key it advertises is advertised by another member too"
        u1, signers = _check_adverts(kept, self._params, None)
        t, c = self._params.threshold, self._params.colluders
        if len(u1) < t:
            raise SecAggError(f"|U1| = {len(u1)} is below threshold {t}")
        if 2 * t <= len(u1) + c:
            raise SecAggError(f"|U1| = {len(u1)} is not below 2t - c = {2 * t - c}: devices would refuse it")
        self._u1, self._signers, self._stage = u1, signers, "shares"
        return {p: dict(kept[p]) for p in sorted(u1)}, excluded

    def route_shares(self, sent: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        self._require("shares", "route_shares")
        if not isinstance(sent, dict):
            raise SecAggError("shares must map sender id to its ciphertexts")
        for sender, cts in sent.items():
            if sender not in self._u1:
                raise SecAggError(f"shares from {sender!r}, who is not in U1")
            # A sender that skipped someone would leave that recipient masking against a different U2.
            if not isinstance(cts, dict) or set(cts) != set(self._u1) - {sender}:
                raise SecAggError(f"shares from {sender!r} must address every other member of U1")
            if not all(isinstance(ct, bytes) for ct in cts.values()):
                raise SecAggError(f"shares from {sender!r} must be bytes")
        u2 = sorted(sent)
        if len(u2) < self._params.threshold:
            raise SecAggError(f"|U2| = {len(u2)} is below threshold {self._params.threshold}")
        self._u2, self._stage = u2, "masked"
        return {r: {s: sent[s][r] for s in u2 if s != r} for r in u2}

    def receive_masked(self, masked: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
        self._require("masked", "receive_masked")
        if not isinstance(masked, dict):
            raise SecAggError("masked inputs must map sender id to a vector")
        u2 = set(self._u2)
        for sender, vec in masked.items():
            if sender not in u2:
                raise SecAggError(f"masked input from {sender!r}, who is not in U2")
            _check_vector(vec, self._params.vector_length, f"masked input of {sender!r}")
        u3 = sorted(masked)
        if len(u3) < self._params.threshold:
            raise SecAggError(f"|U3| = {len(u3)} is below threshold {self._params.threshold}: round aborted")
        total = np.zeros(self._params.vector_length, dtype=np.uint64)
        for sender in u3:
            total += masked[sender]  # wraps modulo 2**64
        self._u3, self._dead = u3, sorted(u2 - set(u3))
        self._total, self._stage = total, "consistency"
        return list(self._u3), list(self._dead)

    def receive_signatures(self, signatures: dict[str, bytes]) -> dict[str, bytes]:
        """The consistency round: U4, the survivors whose signature over (session, U1, alive, dead) verifies;
        at least t are needed. Returns the signatures to relay to U4."""
        self._require("consistency", "receive_signatures")
        if not isinstance(signatures, dict):
            raise SecAggError("consistency signatures must map signer id to signature")
        message = _consistency_message(self._params, _u1_digest(self._u1), self._u3, self._dead)
        valid = {signer: sig for signer, sig in signatures.items()
                 if signer in self._u3 and isinstance(sig, bytes)
                 and verify_signature(self._signers[signer], sig, message)}
        if len(valid) < self._params.threshold:
            raise SecAggError(f"{len(valid)} valid consistency signatures, below threshold {self._params.threshold}")
        self._u4, self._stage = sorted(valid), "unmask"
        return dict(sorted(valid.items()))

    def unmask(self, shares: dict[str, dict[str, bytes]]) -> np.ndarray:
        self._require("unmask", "unmask")
        assert self._total is not None
        params = self._params
        t = params.threshold
        if not isinstance(shares, dict):
            raise SecAggError("unmask replies must map responder id to its shares")
        index = {p: i + 1 for i, p in enumerate(sorted(self._u1))}
        u2 = set(self._u2)
        for responder, reply in shares.items():
            if responder not in self._u4:
                raise SecAggError(f"unmask reply from {responder!r}, who did not sign the survivor view")
            if not isinstance(reply, dict) or not set(reply) <= u2:
                raise SecAggError(f"unmask reply from {responder!r} names participants outside U2")
            for v, share in reply.items():
                if _parse_share(share, v)[0] != index[responder]:
                    raise SecAggError(f"share for {v!r} from {responder!r} carries the wrong index")
        if len(shares) < t:
            raise SecAggError(f"{len(shares)} unmask replies, below threshold {t}")

        def collect(v: str) -> list[bytes]:
            return [reply[v] for reply in shares.values() if v in reply]

        total = self._total.copy()
        for v in self._u3:
            b = _combine(collect(v), t, f"b of {v!r}")
            total -= _prg(_self_mask_key(b, params.session_id), params.vector_length)
        for u in self._dead:
            s_sk = _combine(collect(u), t, f"s key of {u!r}")
            if _public(s_sk) != self._u1[u]["s"]:
                raise SecAggError(f"reconstructed s key of {u!r} does not match its public key")
            for v in self._u3:
                # v added +PRG(s_uv) if v < u, else subtracted it: undo exactly that.
                pair = _pair_mask(s_sk, self._u1[v]["s"], params, u, v)
                if v < u:
                    total -= pair
                else:
                    total += pair
        self._stage, self._total = "done", None
        return total

    @property
    def survivors(self) -> list[str]:
        """U3, once receive_masked has run."""
        if self._stage not in ("consistency", "unmask", "done"):
            raise SecAggError("survivors are known only after receive_masked")
        return list(self._u3)

"""Secure aggregation (Bonawitz et al., CCS 2017) on a complete graph: sums of uint64 vectors modulo 2**64.

Client u sends y_u = x_u + PRG(b_u) + sum over v in U2 minus u of +-PRG(s_uv) mod 2**64, with b_u a fresh 256-bit
seed, s_uv an HKDF key over X25519 of the "s" keys of u and v, and ChaCha20 as PRG: alone, y_u looks uniform.
Pairwise masks cancel in the sum; b_u and u's s key are Shamir-shared (threshold t) to all of U1, encrypted
pairwise. At unmask a client reveals, per participant, the share of b (alive) or of s_sk (dead), never both,
once, and only if at least t are alive. So a semi-honest server (follows the protocol, reads all it sees)
learns only the sum of U3's inputs, |U3| >= t, and a late reply from a node declared dead stays masked by
PRG(b). Not protected: a malicious server that tells clients different alive sets (the signed consistency
round is not implemented) or substitutes public keys (relayed unauthenticated, so it can sit in the middle of
every pair); either can expose one client's input: the caller's "subverted aggregation" case. Answer-once
holds per live state: a kept older `to_bytes` snapshot could be replayed, so store only the newest.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

try:  # the field Shamir works in, to reuse Lagrange weights (see _combine)
    from Crypto.Protocol.SecretSharing import _Element as _GF
except ImportError:  # pragma: no cover
    _GF = None

__all__ = ["ClientSession", "SecAggError", "ServerSession", "SessionParams"]

_LABEL = b"fedrec-secagg/v1"
_STATE_FORMAT = "fedrec-secagg-client/1"
_KEY_LEN = 32
_PRG_NONCE = bytes(16)  # fixed: every PRG key is derived for exactly one stream
_AEAD_NONCE_LEN = 12
_HALF = 16  # pycryptodome's Shamir shares 16-byte secrets
_SHARE_LEN = 4 + 2 * _HALF  # big-endian index + the shares of the two halves
_PLAINTEXT_LEN = 2 * _SHARE_LEN  # s_sk share then b share
_MAX_ID_LEN = 256
_KEY_NAMES = ("c", "s")

# Client stages, in order; "done" means the unmask request was answered.
_KEYS, _SHARED, _RECEIVED, _MASKED, _DONE = "keys", "shared", "received", "masked", "done"
_STAGES = (_KEYS, _SHARED, _RECEIVED, _MASKED, _DONE)

PublicKeys = dict[str, bytes]


class SecAggError(ValueError):
    """A protocol check failed; the message names the check and never quotes input vectors."""


@dataclass(frozen=True)
class SessionParams:
    """What every participant of one round attempt agrees on."""

    session_id: bytes  # unique per round attempt; bound into every KDF and AEAD
    threshold: int  # t: shares needed to reconstruct; also the least number of inputs in any decryptable sum
    vector_length: int  # number of uint64 entries summed

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, bytes) or not self.session_id:
            raise SecAggError("session_id must be non-empty bytes")
        if not _is_int(self.threshold) or self.threshold < 1:
            raise SecAggError("threshold must be a positive integer")
        if not _is_int(self.vector_length) or self.vector_length < 1:
            raise SecAggError("vector_length must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id.hex(), "threshold": self.threshold,
                "vector_length": self.vector_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionParams:
        try:
            return cls(session_id=bytes.fromhex(d["session_id"]), threshold=d["threshold"],
                       vector_length=d["vector_length"])
        except (KeyError, TypeError, ValueError) as exc:
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
    return _frame(params.session_id, struct.pack(">QQ", params.threshold, params.vector_length))


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


# ------------------------------------------------------------------------------------------------ client


class ClientSession:
    """One participant's side; serialisable between stages (each stage may run in a fresh process)."""

    def __init__(self, *, params: SessionParams, my_id: str, min_threshold: int, stage: str,
                 c_sk: bytes | None, s_sk: bytes | None, b: bytes | None,
                 u1: dict[str, PublicKeys] | None, u2: list[str] | None,
                 held: dict[str, dict[str, bytes]] | None) -> None:
        # Private: use start() or from_bytes().
        self._params = params
        self._my_id = my_id
        self._min_threshold = min_threshold
        self._stage = stage
        self._c_sk = c_sk
        self._s_sk = s_sk
        self._b = b
        self._u1 = u1
        self._u2 = u2
        self._held = held  # participant id -> {"s": share, "b": share} held for it (mine included)

    @classmethod
    def start(cls, params: SessionParams, my_id: str, *,
              min_threshold: int = 1) -> tuple[ClientSession, dict[str, bytes]]:
        if not isinstance(params, SessionParams):
            raise SecAggError("params must be SessionParams")
        _check_id(my_id, "my_id")
        cls._check_threshold(params, min_threshold)
        c_sk = X25519PrivateKey.generate().private_bytes_raw()
        s_sk = X25519PrivateKey.generate().private_bytes_raw()
        session = cls(params=params, my_id=my_id, min_threshold=min_threshold, stage=_KEYS, c_sk=c_sk,
                      s_sk=s_sk, b=None, u1=None, u2=None, held=None)
        return session, session._public_keys()

    @staticmethod
    def _check_threshold(params: SessionParams, min_threshold: int) -> None:
        if not _is_int(min_threshold):
            raise SecAggError("min_threshold must be an integer")
        if params.threshold < 2 or params.threshold < min_threshold:
            raise SecAggError(f"threshold {params.threshold} is below the least accepted "
                              f"({max(2, min_threshold)})")

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

    def share_keys(self, keys: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
        """Shamir-share b and s_sk over U1 and encrypt each member's shares to it."""
        self._require(_KEYS, "share_keys")
        u1 = _check_keys(keys)
        if u1.get(self._my_id) != self._public_keys():
            raise SecAggError("own public keys missing or altered in the key list")
        t = self._params.threshold
        if len(u1) < t:
            raise SecAggError(f"|U1| = {len(u1)} is below threshold {t}")
        if 2 * t <= len(u1):
            # With t <= |U1| / 2 two disjoint groups of t could each reconstruct a different view (one node both
            # alive and dead) of the same key list: Bonawitz et al. need t > n / 2. This is checked on this
            # device's own view only; a server that sends devices different key lists can still split them
            # (no Sybils needed), which is why the subverted-aggregation figure exists (README, Privacy model).
            raise SecAggError(f"threshold {t} is not above half of |U1| = {len(u1)}")
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
        self._u1, self._b, self._held, self._stage = u1, b, held, _SHARED
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

    def unmask(self, alive: list[str], dead: list[str]) -> dict[str, bytes]:
        """Reveal b-shares of `alive` and s_sk-shares of `dead` (never both for one node), once."""
        self._require(_MASKED, "unmask")
        assert self._u2 is not None and self._held is not None
        alive_l = _check_id_list(alive, "alive list")
        dead_l = _check_id_list(dead, "dead list")
        if set(alive_l) & set(dead_l):
            raise SecAggError("alive and dead lists overlap")
        if not (set(alive_l) | set(dead_l)) <= set(self._u2):
            raise SecAggError("alive or dead list names a participant outside U2")
        if len(alive_l) < self._params.threshold:
            raise SecAggError(f"|alive| = {len(alive_l)} is below threshold {self._params.threshold}")
        if self._my_id not in alive_l:
            raise SecAggError("this client is not in the alive list")
        reply = {v: self._held[v]["b"] for v in alive_l}
        reply.update({v: self._held[v]["s"] for v in dead_l})
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
            "min_threshold": self._min_threshold, "stage": self._stage, "c_sk": hx(self._c_sk),
            "s_sk": hx(self._s_sk), "b": hx(self._b),
            "u1": None if self._u1 is None else {p: {k: v.hex() for k, v in e.items()} for p, e in self._u1.items()},
            "u2": self._u2,
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
            u2 = None if state["u2"] is None else _check_id_list(state["u2"], "stored U2")
            held = None if state["held"] is None else {
                _check_id(p, "stored shares"): {k: unhex(e[k], _SHARE_LEN) for k in ("s", "b")}
                for p, e in state["held"].items()}
            session = cls(params=params, my_id=_check_id(state["my_id"], "stored id"),
                          min_threshold=state["min_threshold"], stage=stage,
                          c_sk=unhex(state["c_sk"], _KEY_LEN), s_sk=unhex(state["s_sk"], _KEY_LEN),
                          b=unhex(state["b"], _KEY_LEN), u1=u1, u2=u2, held=held)  # type: ignore[arg-type]
        except SecAggError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecAggError("malformed client state") from None
        cls._check_threshold(params, session._min_threshold)
        # Each stage needs exactly its secrets; a state missing them cannot be resumed.
        needs = {_KEYS: ("c_sk", "s_sk"), _SHARED: ("c_sk", "s_sk", "b", "u1", "held"),
                 _RECEIVED: ("s_sk", "b", "u1", "u2", "held"), _MASKED: ("u1", "u2", "held"), _DONE: ()}[stage]
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
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._dead: list[str] = []
        self._total: np.ndarray | None = None

    def _require(self, stage: str, step: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"{step} called out of order (stage is {self._stage!r}, needs {stage!r})")

    def receive_keys(self, keys: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        self._require("keys", "receive_keys")
        u1 = _check_keys(keys)
        if len(u1) < self._params.threshold:
            raise SecAggError(f"|U1| = {len(u1)} is below threshold {self._params.threshold}")
        self._u1, self._stage = u1, "shares"
        return {p: dict(e) for p, e in u1.items()}

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
        self._total, self._stage = total, "unmask"
        return list(self._u3), list(self._dead)

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
            if responder not in self._u3:
                raise SecAggError(f"unmask reply from {responder!r}, who is not alive")
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
        if self._stage not in ("unmask", "done"):
            raise SecAggError("survivors are known only after receive_masked")
        return list(self._u3)

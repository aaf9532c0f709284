"""Enrolled device identities: an enrolment authority's Ed25519 key certifies each device's long-term signing key.

A device certificate is an X.509 certificate signed with the authority's Ed25519 key whose subject common name
is the device's unique device id (its secure-aggregation participant id) and whose public key is the device's
Ed25519 signing key. A device pins the authority's public key in its own settings (never from the run) and
takes part in a secure sum only with members whose certificate chains to that key, so a server that does not
hold the authority cannot invent members. Who should hold the authority: docs/privacy.md.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

__all__ = ["Authority", "DeviceIdentity", "IdentityError", "authority_key_from_hex", "verify_certificate"]

KEY_LEN = 32  # raw Ed25519 public key
SIGNATURE_LEN = 64
DEFAULT_VALIDITY = datetime.timedelta(days=365)
_AUTHORITY_NAME = "fedrec enrolment authority"


class IdentityError(ValueError):
    """A certificate, key or signature is missing, malformed or does not verify; the message names which."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def authority_key_from_hex(text: str, *, source: str) -> Ed25519PublicKey:
    """The pinned authority key from its 64 hex digits (as `fedrec enrol authority` prints it)."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != KEY_LEN:
        raise IdentityError(f"{source}: enrolment-authority must be the authority's Ed25519 public key as 64 hex "
                            f"digits (fedrec enrol authority prints it), got {text!r}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public_key: bytes) -> str:
    """A short name of a raw public key for logs and status lines (never a secret)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class Authority:
    """The enrolment authority: issues device certificates. Keep its private key off the aggregating server."""

    key: Ed25519PrivateKey

    @classmethod
    def create(cls) -> Authority:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Authority:
        """Simulation only: an authority derived from the run's seed (the experimenter owns every device)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fedrec-sim-authority" + seed).digest()))

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.key.public_key())

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def issue(self, device_id: str, device_key: Ed25519PublicKey, *,
              valid_for: datetime.timedelta = DEFAULT_VALIDITY) -> bytes:
        """A DER certificate binding `device_id` to `device_key`."""
        _check_device_id(device_id)
        now = _utcnow()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _AUTHORITY_NAME)]))
                .public_key(device_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + valid_for)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(self.key, algorithm=None))
        return cert.public_bytes(serialization.Encoding.DER)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @classmethod
    def read(cls, path: Path) -> Authority:
        return cls(_read_private_key(path, "enrolment authority key"))


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's long-term signing key and the certificate the authority issued for it."""

    device_id: str
    key: Ed25519PrivateKey
    certificate: bytes  # DER

    @classmethod
    def enrol(cls, device_id: str, authority: Authority, key: Ed25519PrivateKey | None = None) -> DeviceIdentity:
        key = key or Ed25519PrivateKey.generate()
        return cls(device_id, key, authority.issue(device_id, key.public_key()))

    @classmethod
    def simulated(cls, device_id: str, authority: Authority, seed: bytes) -> DeviceIdentity:
        """Simulation only: a key derived from the run's seed and the device id (reproducible runs)."""
        key = Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"fedrec-sim-device" + seed + device_id.encode()).digest())
        return cls.enrol(device_id, authority, key)

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def certificate_pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.certificate).public_bytes(serialization.Encoding.PEM)

    @classmethod
    def read(cls, key_path: Path, cert_path: Path, *, authority: Ed25519PublicKey | None = None) -> DeviceIdentity:
        """A device's key and certificate from its files; the certificate must match the key (and `authority`)."""
        key = _read_private_key(key_path, "device signing key")
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        except (OSError, ValueError) as err:
            raise IdentityError(f"{cert_path}: cannot read the device certificate ({type(err).__name__}: {err})") \
                from None
        device_id = _subject(cert, str(cert_path))
        der = cert.public_bytes(serialization.Encoding.DER)
        if not isinstance(cert.public_key(), Ed25519PublicKey) or \
                _raw_public(cert.public_key()) != _raw_public(key.public_key()):  # type: ignore[arg-type]
            raise IdentityError(f"{cert_path}: the certificate is not for the key in {key_path}")
        if authority is not None:
            verify_certificate(der, authority, device_id, what=str(cert_path))
        return cls(device_id, key, der)


def verify_certificate(certificate: bytes, authority: Ed25519PublicKey, device_id: str, *,
                       what: str = "certificate", now: datetime.datetime | None = None) -> bytes:
    """Check that `certificate` (DER) was issued by `authority` for `device_id` and is valid now; returns the
    device's raw Ed25519 public key."""
    try:
        cert = x509.load_der_x509_certificate(bytes(certificate))
    except (TypeError, ValueError):
        raise IdentityError(f"{what}: not a DER certificate") from None
    try:
        authority.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise IdentityError(f"{what}: not issued by the pinned enrolment authority") from None
    if cert.signature_algorithm_oid != x509.oid.SignatureAlgorithmOID.ED25519:
        raise IdentityError(f"{what}: not an Ed25519 signature")
    subject = _subject(cert, what)
    if not hmac.compare_digest(subject.encode(), device_id.encode()):
        raise IdentityError(f"{what}: issued to {subject!r}, presented as {device_id!r}")
    moment = now or _utcnow()
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise IdentityError(f"{what}: outside its validity ({cert.not_valid_before_utc:%Y-%m-%d} to "
                            f"{cert.not_valid_after_utc:%Y-%m-%d})")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{what}: the certified key is not Ed25519")
    return _raw_public(key)


def certificate_key(certificate: bytes, device_id: str, *, what: str = "certificate") -> bytes:
    """Without a pinned authority (the server's defence in depth; every device pins one): the certificate parses,
    names `device_id` and certifies an Ed25519 key, which is returned raw."""
    try:
        cert = x509.load_der_x509_certificate(bytes(certificate))
    except (TypeError, ValueError):
        raise IdentityError(f"{what}: not a DER certificate") from None
    key = cert.public_key()
    if _subject(cert, what) != device_id or not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{what}: does not name {device_id!r} with an Ed25519 key")
    return _raw_public(key)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _subject(cert: x509.Certificate, what: str) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise IdentityError(f"{what}: the subject must hold exactly one common name (the device id)")
    return names[0].value


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not device_id or len(device_id) > 256 or not device_id.isprintable():
        raise IdentityError(f"device id {device_id!r}: expected 1-256 printable characters")


def _read_private_key(path: Path, what: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise IdentityError(f"{path}: cannot read the {what} ({type(err).__name__}: {err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: the {what} must be an Ed25519 private key")
    return key

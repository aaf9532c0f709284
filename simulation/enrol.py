"""The operator's credentials: the enrolment authority, device certificates, TLS and SuperNode keys.

`fedrec enrol authority|device|tls|node-key` (simulation/cli.py) call these; `fedrec deploy-local`
(simulation/deploy.py) uses the same functions for its loopback federation. None of them overwrites a key or
certificate that exists: a replaced authority key would orphan every device pinned to the old one, and a
replaced device key its certificate.

Who holds what: the authority's private key (authority.key) stays on a machine that is not the aggregating
server (the app's publisher, an attestation service, the organisation's IT); devices pin its public key
(authority.pub, 64 hex digits) in their own policy as `enrolment-authority`. Each device holds its own signing
key (device.key) and certificate (device.crt); ideally it makes the key itself (`fedrec device keygen`) and the
authority certifies only its public key (`fedrec enrol device --public-key`).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrec.shared.config import ConfigError
from fedrec.shared.identity import Authority, DeviceIdentity, IdentityError, authority_key_from_hex, \
    verify_certificate

from .credentials import TlsFiles, write_file, write_node_keys, write_tls

AUTHORITY_KEY, AUTHORITY_PUB = "authority.key", "authority.pub"
DEVICE_KEY, DEVICE_CERT, DEVICE_PUB = "device.key", "device.crt", "device.pub"
DEVICE_VALID_DAYS = 365
TLS_VALID_DAYS = 365
_NODE_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class EnrolError(ConfigError):
    """An enrolment command cannot do what it was asked (a file exists, a key is unreadable, a bad name)."""


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise EnrolError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; refusing to "
                         "overwrite (move it away first: a replaced key orphans whatever it certified or signed)")


def _days(days: int, what: str) -> datetime.timedelta:
    if not isinstance(days, int) or days < 1:
        raise EnrolError(f"{what}: the validity must be at least 1 day, got {days!r}")
    return datetime.timedelta(days=days)


# -- the enrolment authority ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthorityFiles:
    key: Path  # authority.key: its Ed25519 private key (PKCS#8 PEM, mode 0600)
    pub: Path  # authority.pub: its public key as the 64 hex digits a device pins (enrolment-authority)
    public_hex: str


def create_authority(out: Path) -> AuthorityFiles:
    """A new enrolment authority in `out`: authority.key (0600) and authority.pub (the pin). Refuses to replace
    an existing authority."""
    out = Path(out)
    key_path, pub_path = out / AUTHORITY_KEY, out / AUTHORITY_PUB
    _refuse_existing(key_path, pub_path)
    out.mkdir(parents=True, exist_ok=True)
    authority = Authority.create()
    try:
        write_file(key_path, authority.private_pem(), private=True, exclusive=True)
        write_file(pub_path, (authority.public_hex + "\n").encode(), exclusive=True)
    except FileExistsError as err:  # raced with another writer
        raise EnrolError(f"{err.filename}: already exists; refusing to overwrite") from None
    return AuthorityFiles(key_path, pub_path, authority.public_hex)


def read_authority(key_path: Path) -> Authority:
    try:
        return Authority.read(Path(key_path))
    except IdentityError as err:
        raise EnrolError(str(err)) from None


def authority_hex(path: Path) -> str:
    """The pin (64 hex digits) from authority.pub, or from the authority's private key."""
    path = Path(path)
    if path.name != AUTHORITY_KEY and path.suffix == ".pub":
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise EnrolError(f"{path}: cannot read the authority's public key ({err})") from None
        try:
            authority_key_from_hex(text, source=str(path))
        except IdentityError as err:
            raise EnrolError(str(err)) from None
        return text
    return read_authority(path).public_hex


# -- device certificates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceFiles:
    device_id: str
    cert: Path  # device.crt: the certificate (PEM), subject CN = device id
    key: Path | None  # device.key (0600): written only when the authority made the key (no --public-key)
    authority_hex: str


def _read_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo, as `fedrec device keygen` or
    `openssl pkey -pubout` write it)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise EnrolError(f"{path}: cannot read a PEM public key ({type(err).__name__}: {err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EnrolError(f"{path}: the device's key must be Ed25519 (openssl genpkey -algorithm ed25519), got "
                         f"{type(key).__name__}")
    return key


def enrol_device(authority_key: Path, device_id: str, out: Path, *, public_key: Path | None = None,
                 valid_days: int = DEVICE_VALID_DAYS) -> DeviceFiles:
    """A certificate for `device_id` signed by the authority in `authority_key`, in out/device.crt.

    Without `public_key` a fresh Ed25519 key is made here too (out/device.key, mode 0600): the simplest path,
    but the authority's machine then sees the device's private key. With `public_key` (a PEM file the device
    made) only the public key is certified, and no private key is written. Refuses to overwrite either file.
    """
    out = Path(out)
    device_id = str(device_id).strip()
    key_path, cert_path = out / DEVICE_KEY, out / DEVICE_CERT
    _refuse_existing(cert_path, *(() if public_key is not None else (key_path,)))
    authority = read_authority(authority_key)
    valid_for = _days(valid_days, "fedrec enrol device --days")
    private = None if public_key is not None else Ed25519PrivateKey.generate()
    device_key = _read_public_key(public_key) if public_key is not None else private.public_key()  # type: ignore
    try:
        der = authority.issue(device_id, device_key, valid_for=valid_for)
    except IdentityError as err:
        raise EnrolError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    try:
        if private is not None:
            write_file(key_path, DeviceIdentity(device_id, private, der).private_pem(), private=True,
                       exclusive=True)
        write_file(cert_path, x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM),
                   exclusive=True)
    except FileExistsError as err:
        raise EnrolError(f"{err.filename}: already exists; refusing to overwrite") from None
    return DeviceFiles(device_id, cert_path, key_path if private is not None else None, authority.public_hex)


def device_keygen(out: Path) -> tuple[Path, Path]:
    """On the device: its own Ed25519 signing key (out/device.key, 0600) and public key (out/device.pub, PEM) to
    send to the authority (`fedrec enrol device --public-key device.pub`). The private key never leaves."""
    out = Path(out)
    key_path, pub_path = out / DEVICE_KEY, out / DEVICE_PUB
    _refuse_existing(key_path, pub_path)
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), private=True, exclusive=True)
    write_file(pub_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo),
               exclusive=True)
    return key_path, pub_path


def check_device(key_path: Path, cert_path: Path, pinned_hex: str, device_id: str) -> DeviceIdentity:
    """What a device checks of its files at start (client/nodes.py): the key matches the certificate, the
    authority it pins issued it, and it names `device_id`."""
    try:
        pinned = authority_key_from_hex(pinned_hex, source="enrolment-authority")
        identity = DeviceIdentity.read(Path(key_path), Path(cert_path), authority=pinned)
        verify_certificate(identity.certificate, pinned, device_id, what=str(cert_path))
    except IdentityError as err:
        raise EnrolError(str(err)) from None
    return identity


# -- TLS and SuperNode keys ----------------------------------------------------------------------------------
_BIND_ALL = {"0.0.0.0", "::", "[::]"}


def enrol_tls(out: Path, hosts: list[str] | tuple[str, ...], *, valid_days: int = TLS_VALID_DAYS) -> TlsFiles:
    """The SuperLink's TLS files in `out`: ca.crt (for every device and the flwr CLI), server.pem and server.key
    (0600, for the SuperLink only), with each host as a subject alternative name (IP or DNS)."""
    hosts = tuple(h.strip() for h in hosts)
    if not hosts or any(not h for h in hosts):
        raise EnrolError("fedrec enrol tls: give --host with the SuperLink's address as devices dial it "
                         "(an IP address or a DNS name; repeat --host for more)")
    if _BIND_ALL & set(hosts):
        raise EnrolError(f"--host {sorted(_BIND_ALL & set(hosts))[0]}: that is a bind address, not one a device "
                         "dials; give the SuperLink's IP address or DNS name")
    try:
        return write_tls(Path(out), hosts=hosts, valid_for=_days(valid_days, "fedrec enrol tls --days"),
                         ca_name="fedrec SuperLink CA", exclusive=True)
    except FileExistsError as err:
        raise EnrolError(f"{err}; refusing to overwrite") from None


def enrol_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: out/NAME (private, 0600, stays on the device) and out/NAME.pub
    (registered with `flwr supernode register`)."""
    if not _NODE_KEY_NAME.match(name or ""):
        raise EnrolError(f"--name {name!r}: expected a file name of letters, digits, '.', '_' or '-'")
    try:
        return write_node_keys(Path(out), name, exclusive=True)
    except FileExistsError as err:
        raise EnrolError(f"{err}; refusing to overwrite") from None

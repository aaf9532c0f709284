"""Credentials a deployment needs: a TLS CA and the SuperLink's server certificate, SuperNode key pairs.

`fedrec enrol tls` and `fedrec enrol node-key` (simulation/enrol.py) write them for a real federation;
`fedrec deploy-local` writes throwaway ones (valid two days) for loopback with the same functions.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=2)  # throwaway: a local test federation, not a real one
TLS_FILES = ("ca.crt", "server.pem", "server.key")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def write_file(path: Path, data: bytes, *, private: bool = False, exclusive: bool = False) -> Path:
    """Write `data` to `path`; a private file is created with mode 0600 (never readable by others, not even
    for a moment); `exclusive` refuses a file that exists (FileExistsError)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)  # an existing file overwritten keeps its mode otherwise
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd >= 0:
            os.close(fd)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def subject_alternative_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    """An IP address SAN for each host that is one, a DNS name SAN for the others."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_tls(folder: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              valid_for: datetime.timedelta = VALID_FOR, ca_name: str = "fedrec throwaway CA",
              exclusive: bool = False) -> TlsFiles:
    """A self-signed CA and a server certificate for `hosts` (its subject alternative names), signed by it
    (EC P-256): ca.crt, server.pem and server.key (0600), as flower-superlink's --ssl-* options take them.

    The CA's private key is never written: nothing can issue another certificate under this CA. `exclusive`
    refuses to replace any of the three files.
    """
    if not hosts:
        raise ValueError("write_tls: at least one host (the SuperLink's address as devices dial it)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if exclusive:
        existing = [name for name in TLS_FILES if (folder / name).exists()]
        if existing:
            raise FileExistsError(f"{folder}: already holds {', '.join(existing)}")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + valid_for)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=True, crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + valid_for)
                   .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return TlsFiles(
        ca_cert=write_file(folder / "ca.crt", ca_cert.public_bytes(pem), exclusive=exclusive),
        server_cert=write_file(folder / "server.pem", server_cert.public_bytes(pem), exclusive=exclusive),
        server_key=write_file(folder / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True, exclusive=exclusive),
    )


def write_node_keys(folder: Path, name: str, *, exclusive: bool = False) -> tuple[Path, Path]:
    """An EC (P-384) key pair in OpenSSH format, as Flower's SuperNode authentication expects: (private NAME,
    mode 0600; public NAME.pub). `exclusive` refuses to replace either file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / name, folder / f"{name}.pub"
    if exclusive:
        existing = [p.name for p in (private_path, public_path) if p.exists()]
        if existing:
            raise FileExistsError(f"{folder}: already holds {', '.join(existing)}")
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
    private = write_file(private_path, private_pem, private=True, exclusive=exclusive)
    public = write_file(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH),
                        exclusive=exclusive)
    return private, public

"""Certificates and keys for a deployment: a private CA, the SuperLink's TLS certificate, and one SuperNode authentication key pair per site."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
# The SuperLink starts its own ServerApp runner, which connects back over loopback and verifies the certificate.
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
_DNS_LABEL = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class KeyFileExistsError(FileExistsError):
    """Raised instead of overwriting an existing certificate or key file."""

    def __init__(self, path: Path):
        super().__init__(f"{path} already exists; refusing to overwrite it (pass --force to replace it)")
        self.path = path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def parse_san(value: str) -> x509.GeneralName:
    """Turn one subject-alternative-name string into an IP address or a DNS name entry, rejecting anything else."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) > 253 or not _DNS_LABEL.match(value):
        raise ValueError(f"not a valid DNS name or IP address for a certificate: {value!r}")
    return x509.DNSName(value.lower())


def generate_ca(common_name: str = "Privet deployment CA", days: int = 3650):
    """Return (private key, self-signed certificate) of a new CA that signs end-entity certificates but no further CAs."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def generate_server_cert(ca_key, ca_cert: x509.Certificate, sans: Sequence[str], days: int = 825):
    """Return (private key, certificate) for a TLS server, signed by the CA and valid for the given DNS names and IP addresses."""
    names = list(dict.fromkeys(parse_san(s) for s in sans))
    if not names:
        raise ValueError("a server certificate needs at least one DNS name or IP address (--san)")
    first_dns = next((n.value for n in names if isinstance(n, x509.DNSName)), None)
    common_name = first_dns or str(names[0].value)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def generate_site_key() -> ec.EllipticCurvePrivateKey:
    """Return a new SuperNode authentication key: ECDSA on NIST P-384, the curve Flower's documentation uses."""
    return ec.generate_private_key(ec.SECP384R1())


def cert_pem(cert: x509.Certificate) -> bytes:
    """Return the certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def tls_key_pem(key) -> bytes:
    """Return a TLS private key as unencrypted PKCS#8 PEM, the form flower-superlink --ssl-keyfile reads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def site_private_key_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the site key in unencrypted OpenSSH format, which flower-supernode --auth-supernode-private-key loads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def site_public_key_openssh(key: ec.EllipticCurvePrivateKey, comment: str = "") -> bytes:
    """Return the public half as one OpenSSH line (`ecdsa-sha2-nistp384 ...`), which `flwr supernode register` loads."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode("ascii") if comment else b"") + b"\n"


def public_key_fingerprint(public_openssh: bytes) -> str:
    """Return the OpenSSH-style SHA256 fingerprint of a public key line, for checking a key by phone before registering it."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise KeyFileExistsError(path)


def write_file(path: Path, data: bytes, private: bool, force: bool = False) -> Path:
    """Write `data` to `path`, created with mode 0600 if private (0644 otherwise, less the umask); never overwrite unless force."""
    path = Path(path)
    mode = 0o600 if private else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise KeyFileExistsError(path) from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return path
    # Replace through a new file created with the right mode: an old file's looser mode is never inherited.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_certificates(out_dir: Path, sans: Sequence[str], force: bool = False,
                       ca_days: int = 3650, server_days: int = 825) -> dict[str, Path]:
    """Create a CA and a SuperLink server certificate in out_dir (ca.crt, ca.key, server.crt, server.key); return the paths by name."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _refuse_existing(paths.values(), force)
    ca_key, ca_cert = generate_ca(days=ca_days)
    server_key, server_cert = generate_server_cert(ca_key, ca_cert, sans, days=server_days)
    write_file(paths[CA_KEY], tls_key_pem(ca_key), private=True, force=force)
    write_file(paths[SERVER_KEY], tls_key_pem(server_key), private=True, force=force)
    write_file(paths[CA_CERT], cert_pem(ca_cert), private=False, force=force)
    write_file(paths[SERVER_CERT], cert_pem(server_cert), private=False, force=force)
    return paths


def site_key_paths(out_dir: Path, site: str) -> tuple[Path, Path]:
    """Return (private key path, public key path) for a site: out_dir/<site>.key and out_dir/<site>.pub."""
    if not _SITE_NAME.match(site):
        raise ValueError(
            f"invalid site name {site!r}: use letters, digits, '.', '_' or '-' (at most 63 characters)"
        )
    return Path(out_dir) / f"{site}.key", Path(out_dir) / f"{site}.pub"


def write_site_keys(out_dir: Path, site: str, force: bool = False) -> tuple[Path, Path]:
    """Create one site's authentication key pair (<site>.key mode 0600, <site>.pub) in out_dir; return both paths."""
    private_path, public_path = site_key_paths(out_dir, site)
    _refuse_existing((private_path, public_path), force)
    key = generate_site_key()
    write_file(private_path, site_private_key_openssh(key), private=True, force=force)
    write_file(public_path, site_public_key_openssh(key, comment=site), private=False, force=force)
    return private_path, public_path

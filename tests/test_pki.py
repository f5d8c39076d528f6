"""Certificates and site keys: file modes, no silent overwrite, a chain that verifies, and formats Flower itself loads."""

import argparse
import datetime
import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from common import pki
from privet import cli


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    return pki.write_certificates(out, ["superlink", "privet.example.org", "10.1.2.3", *pki.LOOPBACK_SANS])


def test_certificate_files_and_modes(certs):
    assert set(certs) == {"ca.crt", "ca.key", "server.crt", "server.key"}
    for name, path in certs.items():
        assert path.is_file() and path.name == name
    assert _mode(certs["ca.key"]) == 0o600
    assert _mode(certs["server.key"]) == 0o600
    assert not _mode(certs["ca.crt"]) & 0o022  # public, but writable by its owner only


def test_chain_verifies_for_every_san_and_not_for_others(certs):
    ca = x509.load_pem_x509_certificate(certs["ca.crt"].read_bytes())
    leaf = x509.load_pem_x509_certificate(certs["server.crt"].read_bytes())
    store = verification.Store([ca])
    now = datetime.datetime.now(datetime.timezone.utc)
    # cryptography's verifier applies the strict Web PKI profile (key usages, AKI/SKI, SAN), as Python 3.13's ssl does.
    for subject in (verification.DNSName("superlink"), verification.DNSName("localhost"),
                    verification.DNSName("privet.example.org"),
                    verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    verification.IPAddress(ipaddress.ip_address("10.1.2.3")),
                    verification.IPAddress(ipaddress.ip_address("::1"))):
        verifier = verification.PolicyBuilder().store(store).time(now).build_server_verifier(subject)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca
    wrong = verification.PolicyBuilder().store(store).time(now).build_server_verifier(verification.DNSName("evil.example"))
    with pytest.raises(verification.VerificationError):
        wrong.verify(leaf, [])
    other_ca = x509.load_pem_x509_certificate(pki.cert_pem(pki.generate_ca()[1]))
    other = verification.PolicyBuilder().store(verification.Store([other_ca])).time(now)
    with pytest.raises(verification.VerificationError):
        other.build_server_verifier(verification.DNSName("superlink")).verify(leaf, [])


def test_sans_and_ca_constraints(certs):
    leaf = x509.load_pem_x509_certificate(certs["server.crt"].read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink", "privet.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1", "::1"}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca = x509.load_pem_x509_certificate(certs["ca.crt"].read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0


def test_bad_san_rejected():
    with pytest.raises(ValueError, match="not a valid DNS name"):
        pki.parse_san("not a host")
    with pytest.raises(ValueError):
        pki.generate_server_cert(*pki.generate_ca(), sans=[])


def test_no_overwrite_without_force(tmp_path):
    paths = pki.write_certificates(tmp_path, ["localhost"])
    before = {name: path.read_bytes() for name, path in paths.items()}
    with pytest.raises(FileExistsError, match=r"ca\.crt already exists.*--force"):
        pki.write_certificates(tmp_path, ["localhost"])
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    # One existing file blocks the whole set, so a CA never gets separated from the certificate it signed.
    paths["ca.crt"].unlink()
    with pytest.raises(FileExistsError, match=r"ca\.key already exists"):
        pki.write_certificates(tmp_path, ["localhost"])
    assert not paths["ca.crt"].exists()
    pki.write_certificates(tmp_path, ["localhost"], force=True)
    assert paths["server.key"].read_bytes() != before["server.key"]


def test_force_replaces_loose_mode_with_0600(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("old")
    os.chmod(key, 0o644)
    pki.write_file(key, b"new", private=True, force=True)
    assert key.read_bytes() == b"new" and _mode(key) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_private_key_created_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        private, public = pki.write_site_keys(tmp_path, "site-9")
    finally:
        os.umask(old)
    assert _mode(private) == 0o600
    assert _mode(public) == 0o644


def test_site_keys_load_with_flowers_own_loaders(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    private, public = pki.write_site_keys(tmp_path, "site-1")
    assert private.name == "site-1.key" and public.name == "site-1.pub"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().strip().endswith(" site-1")
    # What `flwr supernode register site-1.pub` sends to the SuperLink ...
    registered = try_load_public_key(public)
    # ... must equal what `flower-supernode --auth-supernode-private-key site-1.key` authenticates with.
    keys = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(private), auth_supernode_public_key=None)
    )
    assert isinstance(keys[0], ec.EllipticCurvePrivateKey) and keys[0].curve.name == "secp384r1"
    assert public_key_to_bytes(keys[1]) == registered
    with pytest.raises(FileExistsError, match="site-1.key already exists"):
        pki.write_site_keys(tmp_path, "site-1")
    with pytest.raises(ValueError, match="invalid site name"):
        pki.write_site_keys(tmp_path, "../elsewhere")


def test_fingerprint_matches_openssh_format(tmp_path):
    _, public = pki.write_site_keys(tmp_path, "site-2")
    fingerprint = pki.public_key_fingerprint(public.read_bytes())
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 7 + 43


def test_cli_certs_and_site_keys(tmp_path, capsys):
    assert cli.main(["certs", "--out", str(tmp_path / "c"), "--san", "superlink,10.0.0.1"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates", "root-certificates"):
        assert flag in out
    leaf = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}

    assert cli.main(["certs", "--out", str(tmp_path / "c")]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli.main(["certs", "--out", str(tmp_path / "c"), "--force"]) == 0
    capsys.readouterr()

    assert cli.main(["site-keys", "--out", str(tmp_path / "k"), "--site", "site-1"]) == 0
    out = capsys.readouterr().out
    assert "--auth-supernode-private-key" in out and "flwr supernode register site-1.pub" in out
    assert _mode(tmp_path / "k" / "site-1.key") == 0o600
    assert cli.main(["site-keys", "--out", str(tmp_path / "k"), "--site", "site-1"]) == 1
    assert "site-1.key already exists" in capsys.readouterr().err
    assert cli.main(["certs", "--out", str(tmp_path / "bad"), "--san", "bad name"]) == 1
    assert "not a valid DNS name" in capsys.readouterr().err


def test_cli_sets_flower_off_switches_before_flower_is_imported():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    code = "import sys, os, privet.cli; print('flwr' in sys.modules, *[os.environ[n] for n in sys.argv[1:]])"
    names = ["FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]
    done = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60, check=True)
    assert done.stdout.split() == ["False", "0", "1", "1"]

"""Which site each node is: bound to its registered authentication key, never taken from what a reply claims.

In a deployment the coordinator lists each site's SuperNode public key in a site registry (run-config
``site-registry``, a TOML file on the server). A node's site is then the one its key is registered
for, and a reply that names another site is set aside. Without a registry (simulation, or a
deployment that has not written one) a node is bound to the first site id it claims, and no other
node may take that id afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization

log = logging.getLogger("flwr.privet.server")


class RegistryError(ValueError):
    """The site registry cannot be read or is inconsistent."""


def key_fingerprint(public_key) -> str:
    """SHA-256 over a public key's DER SubjectPublicKeyInfo, whatever format it came in (OpenSSH line or PEM)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_public_key(data: bytes):
    """A public key from an OpenSSH ``.pub`` line (as `privet site-keys` writes) or PEM (as Flower stores it)."""
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(data)
    return serialization.load_ssh_public_key(data)


def read_registry(path: str | Path) -> dict[str, str]:
    """Key fingerprint -> site id, from a TOML file whose ``[sites]`` table maps each site id to its .pub file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"site registry {path} does not exist; fix site-registry in the run config") from None
    except tomllib.TOMLDecodeError as err:
        raise RegistryError(f"site registry {path} is not valid TOML: {err}") from None
    sites = raw.get("sites")
    if not isinstance(sites, dict) or not sites or set(raw) != {"sites"}:
        raise RegistryError(
            f'site registry {path}: write one [sites] table mapping each site id to its key, e.g. site-1 = "site-1.pub"'
        )
    registry: dict[str, str] = {}
    for site, key_file in sites.items():
        if not isinstance(key_file, str):
            raise RegistryError(f"site registry {path}: {site} must name its public key file")
        key_path = path.parent / key_file
        try:
            fingerprint = key_fingerprint(load_public_key(key_path.read_bytes()))
        except (OSError, ValueError) as err:
            raise RegistryError(f"site registry {path}: cannot read {site}'s public key {key_path}: {err}") from None
        if fingerprint in registry:
            raise RegistryError(f"site registry {path}: {registry[fingerprint]} and {site} list the same key")
        registry[fingerprint] = site
    return registry


class SiteIdentities:
    """Binds node ids to site ids for the whole run and judges each round's claims against the bindings."""

    def __init__(self, registry: Mapping[str, str] | None = None):
        self.registry = dict(registry) if registry is not None else None
        self.bound: dict[int, str] = {}

    def learn_nodes(self, nodes: Iterable) -> None:
        """With a registry: bind every node whose authentication key is registered (Flower's ``grid.get_nodes()``)."""
        if self.registry is None:
            return
        for node in nodes:
            key = getattr(node, "public_key", b"") or b""
            try:
                site = self.registry.get(key_fingerprint(load_public_key(key))) if key else None
            except ValueError:
                site = None
            if site is not None:
                self.bound[node.node_id] = site

    def judge(self, claims: Mapping[int, str]) -> tuple[dict[int, str], dict[int, str]]:
        """Each node's verified site, and the reason each other node's reply is set aside (keyed by node id)."""
        verified: dict[int, str] = {}
        refused: dict[int, str] = {}
        owners = {site: node for node, site in self.bound.items()}
        fresh = Counter(site for node, site in claims.items() if node not in self.bound and site not in owners)
        for node, claimed in claims.items():
            bound = self.bound.get(node)
            if bound is not None:
                if claimed == bound:
                    verified[node] = bound
                else:
                    refused[node] = f"node {node} is {bound} but its reply names {claimed}"
            elif self.registry is not None:
                refused[node] = f"node {node} (claiming {claimed}) has no key in the site registry"
            elif claimed in owners:
                refused[node] = f"node {node} claims {claimed}, which node {owners[claimed]} already is"
            elif fresh[claimed] > 1:
                # Which node really is the site cannot be told apart here, so none of them is trusted.
                refused[node] = f"{claimed} claimed by {fresh[claimed]} new nodes in one round; all set aside"
            else:
                self.bound[node] = verified[node] = claimed
        for node, reason in refused.items():
            log.warning("reply set aside: %s", reason)
        return verified, refused

    def name(self, node: int) -> str:
        """The site a node is bound to, or ``node-<id>`` for one that is not."""
        return self.bound.get(node, f"node-{node}")

#!/usr/bin/env bash
# Create or update the Secrets and ConfigMaps that the manifests mount, from the files `privet certs` and
# `privet site-keys` wrote. Arguments: which parts to create, `superlink` and/or site names (default: all).
#   deploy/k8s/create-secrets.sh superlink          # at the coordinator
#   deploy/k8s/create-secrets.sh site-2             # at site-2 (needs secrets/ca.crt and secrets/sites/site-2.key)
# PRIVET_SECRETS overrides the key directory (default deploy/secrets), PRIVET_REGISTRY the site registry directory
# (default deploy/registry), PRIVET_NAMESPACE the namespace (privet).
set -euo pipefail
deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secrets="${PRIVET_SECRETS:-$deploy/secrets}"
registry="${PRIVET_REGISTRY:-$deploy/registry}"
namespace="${PRIVET_NAMESPACE:-privet}"
parts=("$@")
if [ "${#parts[@]}" -eq 0 ]; then
    parts=(superlink site-1 site-2 site-3)
fi

apply() {
    # Render client-side, then apply: creates the object or updates it in place.
    kubectl -n "$namespace" create "$@" --dry-run=client -o yaml | kubectl apply -f -
}

for part in "${parts[@]}"; do
    if [ "$part" = superlink ]; then
        apply secret generic privet-superlink-tls \
            --from-file=ca.crt="$secrets/ca.crt" \
            --from-file=server.crt="$secrets/server.crt" \
            --from-file=server.key="$secrets/server.key"
        apply configmap privet-proxy --from-file=nginx.conf="$deploy/proxy/nginx.conf"
        # The site registry: sites.toml and the public keys it names (deploy/registry/, see ../README.md).
        apply configmap privet-registry --from-file="$registry"
    else
        apply secret generic "privet-$part" \
            --from-file=ca.crt="$secrets/ca.crt" \
            --from-file=site.key="$secrets/sites/$part.key"
        apply configmap "privet-$part-policy" --from-file=policy.toml="$deploy/sites/$part/policy.toml"
    fi
done

"""The site policy: a TOML file only the site administrator edits, which the server's run config cannot loosen."""

from __future__ import annotations

import logging

import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig

POLICY_KEYS = {
    "site-id": str,
    "data-path": str,
    "text-column": str,
    "label-column": str,
    "epsilon-cap": float,
    "delta": float,
    "ledger-path": str,
    "allowed-models": list,
    "max-rounds": int,
}
# Keys a policy may leave out; the comment says what leaving it out means.
OPTIONAL_KEYS = {
    "labels": list,  # the site's label set: absent = the run's `labels` (or the bundled data set's)
    "public-example-count": int,  # a count the site declares public: absent = a DP count, charged to the ledger
    "max-examples": int,  # train on at most this many records (chosen by a stable hash): absent = all
    "evaluate": bool,  # answer evaluation requests with DP scores: absent = true
    "allowed-apps": list,  # SHA-256 of the app bundles `privet site-node` may run: absent = it refuses to start
}


class PolicyError(ValueError):
    """The site policy file is missing, malformed, or incomplete."""


class Declined(Exception):
    """The site refuses this request; the reason is sent to the server and logged at the site."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows: its own data, its privacy cap, its ledger, the models it trusts."""

    site_id: str
    data_path: Path
    text_column: str
    label_column: str
    epsilon_cap: float
    delta: float
    ledger_path: Path
    allowed_models: tuple[str, ...]
    max_rounds: int
    labels: tuple[str, ...] | None = None
    public_example_count: int | None = None
    max_examples: int | None = None
    evaluate: bool = True
    allowed_apps: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """Read and validate a policy file; every key is required so nothing is left to a server default."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise PolicyError(f"site policy {path} does not exist; pass the right path in --node-config") from err
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"site policy {path} is not valid TOML: {err}") from err
        missing = sorted(set(POLICY_KEYS) - set(raw))
        unknown = sorted(set(raw) - set(POLICY_KEYS) - set(OPTIONAL_KEYS))
        if missing or unknown:
            raise PolicyError(
                f"site policy {path}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing key(s) {', '.join(missing)}" if missing else "",
                        f"unknown key(s) {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
                + f". Required keys: {', '.join(POLICY_KEYS)}; optional keys: {', '.join(OPTIONAL_KEYS)}"
            )
        for key, kind in {**POLICY_KEYS, **OPTIONAL_KEYS}.items():
            if key not in raw:
                continue
            value = raw[key]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok or (isinstance(value, bool) and kind is not bool):
                raise PolicyError(f"site policy {path}: {key} must be a {kind.__name__}")
        for key in ("public-example-count", "max-examples"):
            if key in raw and raw[key] < 1:
                raise PolicyError(f"site policy {path}: {key} must be at least 1")
        labels = raw.get("labels")
        if labels is not None and (not labels or not all(isinstance(name, str) and name.strip() for name in labels)):
            raise PolicyError(f"site policy {path}: labels must be a non-empty list of label names")
        if not 0 < raw["epsilon-cap"] <= 100:
            raise PolicyError(f"site policy {path}: epsilon-cap must be in (0, 100]")
        if not 0 < raw["delta"] < 0.1:
            raise PolicyError(f"site policy {path}: delta must be in (0, 0.1)")
        if raw["max-rounds"] < 1:
            raise PolicyError(f"site policy {path}: max-rounds must be at least 1")
        models = _hashes(raw["allowed-models"])
        if not models:
            raise PolicyError(
                f"site policy {path}: allowed-models must list SHA-256 hashes of model weights "
                "(64 hex digits each; `privet model-hash MODEL` prints one)"
            )
        apps = _hashes(raw.get("allowed-apps", []))
        if apps is None or ("allowed-apps" in raw and not apps):
            raise PolicyError(
                f"site policy {path}: allowed-apps must list SHA-256 hashes of app bundles "
                "(64 hex digits each; `privet app-hash DIR` prints one)"
            )
        base = path.parent
        return cls(
            site_id=raw["site-id"],
            data_path=(base / raw["data-path"]).resolve(),
            text_column=raw["text-column"],
            label_column=raw["label-column"],
            epsilon_cap=float(raw["epsilon-cap"]),
            delta=float(raw["delta"]),
            ledger_path=(base / raw["ledger-path"]).resolve(),
            allowed_models=models,
            max_rounds=raw["max-rounds"],
            labels=None if labels is None else tuple(name.strip() for name in labels),
            public_example_count=raw.get("public-example-count"),
            max_examples=raw.get("max-examples"),
            evaluate=raw.get("evaluate", True),
            allowed_apps=apps,
        )

    def check_run(self, config: RunConfig, model_sha256: str) -> None:
        """Raise ``Declined`` when the server's run asks for anything this policy does not allow."""
        if not config.dp:
            raise Declined(f"site {self.site_id} policy requires DP training; the run asks dp=false")
        if model_sha256 not in self.allowed_models:
            # The hash stays in the site's log: in the reply it would describe a file the server chose to point at.
            logging.getLogger("flwr.privet.site").warning(
                "site %s: model %r has weights sha256 %s, which allowed-models does not list",
                self.site_id, config.model, model_sha256)
            raise Declined(
                f"site {self.site_id} policy does not allow model {config.model!r}; ask the site administrator to "
                "add its hash (privet model-hash) to allowed-models"
            )


def _hashes(values: list) -> tuple[str, ...] | None:
    """Lower-case SHA-256 hex digests (an optional "sha256:" prefix dropped), or None if any is not one."""
    hashes = tuple(str(v).lower().removeprefix("sha256:") for v in values)
    if not all(len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in hashes):
        return None
    return hashes

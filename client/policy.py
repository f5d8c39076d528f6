"""The site policy: a TOML file only the site administrator edits, which the server's run config cannot loosen."""

from __future__ import annotations

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
        unknown = sorted(set(raw) - set(POLICY_KEYS))
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
                + f". Allowed keys: {', '.join(POLICY_KEYS)}"
            )
        for key, kind in POLICY_KEYS.items():
            value = raw[key]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok or isinstance(value, bool):
                raise PolicyError(f"site policy {path}: {key} must be a {kind.__name__}")
        if not 0 < raw["epsilon-cap"] <= 100:
            raise PolicyError(f"site policy {path}: epsilon-cap must be in (0, 100]")
        if not 0 < raw["delta"] < 0.1:
            raise PolicyError(f"site policy {path}: delta must be in (0, 0.1)")
        if raw["max-rounds"] < 1:
            raise PolicyError(f"site policy {path}: max-rounds must be at least 1")
        models = tuple(str(m).lower().removeprefix("sha256:") for m in raw["allowed-models"])
        if not models or not all(len(m) == 64 and all(c in "0123456789abcdef" for c in m) for m in models):
            raise PolicyError(
                f"site policy {path}: allowed-models must list SHA-256 hashes of model weights "
                "(64 hex digits each; `privet model-hash MODEL` prints one)"
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
        )

    def check_run(self, config: RunConfig, model_sha256: str) -> None:
        """Raise ``Declined`` when the server's run asks for anything this policy does not allow."""
        if not config.dp:
            raise Declined(f"site {self.site_id} policy requires DP training; the run asks dp=false")
        if model_sha256 not in self.allowed_models:
            raise Declined(
                f"site {self.site_id} policy does not allow model {config.model!r} "
                f"(weights sha256 {model_sha256[:12]}…); ask the site administrator to add it to allowed-models"
            )

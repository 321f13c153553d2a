"""The exit policy a request runs with: the planner's exit setting, unless the user fixed a policy.

The planner prices every calibrated exit setting (``edgeexit.planner.exit_settings``) and picks one with the
split; the device must then exit with that setting's thresholds, or the latency it planned is not the one it
gets. A setting is the stored calibrated policy's kind and parameters with the setting's thresholds;
``no-exit`` is "never exit early". A policy the user asked for (``--policy``) always wins, and the planner is
then told which setting that is, so it plans for what will run. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from edgeexit.bundle import Manifest
from edgeexit.planner import NO_EXIT, ExitSetting, exit_settings
from edgeexit.policies import ExitPolicy, make_policy, never_exit


def setting_policy(manifest: Manifest, setting: str, thresholds: Sequence[float]) -> ExitPolicy:
    """The policy of one planner exit setting: the calibrated kind (and parameters) with its thresholds."""
    if setting == NO_EXIT or not thresholds:
        return never_exit(len(manifest.exits))
    stored = manifest.policy or {}
    return make_policy(stored.get("kind", "confidence"), list(thresholds), **(stored.get("params") or {}))


def planned_settings(manifest: Manifest, fixed: ExitPolicy) -> list[ExitSetting] | None:
    """The planner settings matching a policy the user fixed: "never" is no-exit; a calibrated setting with the
    same kind and thresholds is itself; None when the policy is none of them (the planner then prices every
    setting, an approximation: its exit rates are not the user's)."""
    settings = exit_settings(manifest)
    if fixed.kind == "never":
        return [s for s in settings if s.name == NO_EXIT]
    if (manifest.policy or {}).get("kind") != fixed.kind:
        return None
    same = [s for s in settings[1:] if list(s.thresholds) == list(fixed.thresholds)]
    return same[:1] or None


class PolicyChooser:
    """Per request: the user's fixed policy, else the policy of the setting the planner chose (cached)."""

    def __init__(self, manifest: Manifest, default: ExitPolicy, fixed: bool):
        self.manifest = manifest
        self.default = default  # the calibrated policy (or the user's), for requests without a planner choice
        self.fixed = fixed  # True: the user asked for a policy, so the planner's thresholds are not applied
        self._cache: dict[tuple[str, tuple[float, ...]], ExitPolicy] = {}
        self._lock = threading.Lock()

    def policy(self, setting: str | None, thresholds: Sequence[float] = ()) -> ExitPolicy:
        if self.fixed or setting is None:
            return self.default
        key = (setting, tuple(thresholds))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = setting_policy(self.manifest, setting, thresholds)
            return self._cache[key]

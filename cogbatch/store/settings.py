"""fingerprint -> the settings behind it, kept beside the output, so that a change of settings can be named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogbatch.fsio import atomic_write


class SettingsRegistry:
    """`<output>/.cogbatch/settings.json`: every fingerprint this output's rows carry, with its settings."""

    def __init__(self, output: Path) -> None:
        self.file = output / ".cogbatch" / "settings.json"
        try:
            self.known: dict[str, dict[str, Any]] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}

    def record(self, settings: dict[str, dict[str, Any]]) -> None:
        if all(fp in self.known for fp in settings):
            return
        self.known.update(settings)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.file, json.dumps(self.known, indent=1, sort_keys=True))

"""fingerprint -> the settings behind it, in the output's state directory, so a change of settings can be named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogbatch.fsio import atomic_write
from cogbatch.store.state import SETTINGS, readable, state_file


class SettingsRegistry:
    """`<output>.cogbatch/settings.json`: every fingerprint this output's rows carry, with its settings."""

    def __init__(self, output: Path) -> None:
        self.file = state_file(output, SETTINGS)
        try:
            self.known: dict[str, dict[str, Any]] = json.loads(readable(output, SETTINGS).read_text())
        except (OSError, ValueError):
            self.known = {}

    def record(self, settings: dict[str, dict[str, Any]]) -> None:
        if all(fp in self.known for fp in settings):
            return
        self.known.update(settings)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.file, json.dumps(self.known, indent=1, sort_keys=True))

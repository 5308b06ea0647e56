"""Energy and CO₂ of a job, measured by codecarbon in offline mode (one tracker, rank 0 only)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EnergyTracker:
    """Wraps ``codecarbon.OfflineEmissionsTracker``; if codecarbon cannot measure on this machine
    the run still completes and the summary records why energy is missing."""

    def __init__(self, enabled: bool, country: str, output_dir: Path,
                 measure_power_secs: float = 5.0) -> None:
        self.enabled, self.country, self.output_dir = enabled, country, Path(output_dir)
        self.measure_power_secs = measure_power_secs
        self._tracker = None
        self.error: str | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            # codecarbon logs loudly and may try to reach its API; offline mode + error level.
            os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
            from codecarbon import OfflineEmissionsTracker

            self.output_dir.mkdir(parents=True, exist_ok=True)  # codecarbon fails silently if not

            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, output_dir=str(self.output_dir),
                output_file="emissions.csv", log_level="error", save_to_file=True,
                measure_power_secs=self.measure_power_secs, tracking_mode="process",
                allow_multiple_runs=True,  # parallel sweep jobs each keep their own tracker
                project_name="effbench")
            self._tracker.start()
        except Exception as err:  # noqa: BLE001 - measurement must never kill a run
            self.error = f"{type(err).__name__}: {err}"
            log.warning("codecarbon could not start: %s", self.error)
            self._tracker = None

    def stop(self) -> dict[str, Any]:
        if self._tracker is None:
            return {"kwh": None, "co2_kg": None, "country": self.country,
                    "source": "codecarbon", "error": self.error or "disabled"}
        try:
            co2 = self._tracker.stop()
            # stop() swallows its own errors; no final data means the measurement failed.
            data = getattr(self._tracker, "final_emissions_data", None)
            if data is None:
                raise RuntimeError("codecarbon recorded no emissions data")
            return {"kwh": float(data.energy_consumed), "co2_kg": float(co2 or 0.0),
                    "country": self.country, "source": "codecarbon",
                    "cpu_power_w": float(data.cpu_power), "gpu_power_w": float(data.gpu_power),
                    "error": None}
        except Exception as err:  # noqa: BLE001
            return {"kwh": None, "co2_kg": None, "country": self.country, "source": "codecarbon",
                    "error": f"{type(err).__name__}: {err}"}

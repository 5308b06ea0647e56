"""Energy and CO₂ of a job, measured by codecarbon in offline mode (one tracker, rank 0 only)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from effbench.errors import EffbenchError

log = logging.getLogger(__name__)

# codecarbon's CPU modes → what the figure is. Only power counters measure; the others multiply
# the CPU's TDP (by a constant share or by the load), so on such a machine energy ∝ time.
CPU_MODES = {"intel_rapl": "rapl", "intel_power_gadget": "power_gadget",
             "windows_emi": "power_counters", "apple_powermetrics": "powermetrics",
             "cpu_load": "tdp_x_load_estimate", "constant": "tdp_estimate"}
MEASURED = {"rapl", "power_gadget", "power_counters", "powermetrics", "nvml"}


def check_country(code: str) -> None:
    """The ISO-3 code must be in codecarbon's energy-mix table (else it invents an intensity)."""
    import json
    from importlib.resources import files

    try:
        table = files("codecarbon").joinpath("data/private_infra/global_energy_mix.json")
        known = json.loads(table.read_text())
    except (ImportError, OSError, ValueError):
        return  # no table to check against: codecarbon itself will say what it can
    if str(code) not in known:
        import difflib

        close = difflib.get_close_matches(str(code).upper(), list(known), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise EffbenchError(f"tracking.country={code!r} is not an ISO-3 country code codecarbon "
                            f"knows{hint}; use one such as ESP, DEU or USA (the list: "
                            f"codecarbon/data/private_infra/global_energy_mix.json).")


def measurement_modes(tracker: Any) -> dict[str, Any]:
    """How codecarbon obtained each component's power (read from its hardware objects)."""
    modes: dict[str, Any] = {"cpu": None, "gpu": None, "ram": None}
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            raw = getattr(hw, "_mode", None)
            modes["cpu"] = CPU_MODES.get(raw, str(raw))
        elif kind == "GPU":
            modes["gpu"] = "nvml"
        elif kind == "RAM":
            # codecarbon models RAM power from its size (W per DIMM), never measures it.
            modes["ram"] = "size_model_estimate"
    return modes


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

    def kwh_so_far(self) -> float | None:
        """Energy measured up to now (codecarbon updates it every ``measure_power_secs``)."""
        energy = getattr(self._tracker, "_total_energy", None)
        return float(energy.kWh) if energy is not None else None

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
            modes = measurement_modes(self._tracker)
            return {"kwh": float(data.energy_consumed), "co2_kg": float(co2 or 0.0),
                    "country": self.country, "source": "codecarbon",
                    "cpu_power_w": float(data.cpu_power), "gpu_power_w": float(data.gpu_power),
                    "cpu_kwh": float(data.cpu_energy), "gpu_kwh": float(data.gpu_energy),
                    "ram_kwh": float(data.ram_energy), "mode": modes,
                    "estimated": any(m is not None and m not in MEASURED
                                     for m in modes.values()),
                    "error": None}
        except Exception as err:  # noqa: BLE001
            return {"kwh": None, "co2_kg": None, "country": self.country, "source": "codecarbon",
                    "error": f"{type(err).__name__}: {err}"}

"""Energy and CO₂ of a job, measured by codecarbon in offline mode (one tracker, rank 0 only)."""

from __future__ import annotations

import logging
import os
import threading
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


def quiet_codecarbon() -> str:
    """Sets codecarbon's logger to ERROR (or to ``CODECARBON_LOG_LEVEL`` when the user set it) and
    returns that level for the tracker.

    codecarbon reads its level from the environment once, when first imported (check_country
    has imported it by now), and applies the tracker's ``log_level`` only at the end of the
    tracker's set-up: before that it logs its configuration source twice, "offline tracker init"
    and, with ``allow_multiple_runs``, a "Multiple instances … allowed" warning that says nothing
    about this run. Its logger does not propagate, so its own level is what decides.
    """
    level = os.environ.get("CODECARBON_LOG_LEVEL", "error")
    numeric = logging.getLevelName(level.upper())
    logging.getLogger("codecarbon").setLevel(numeric if isinstance(numeric, int)
                                             else logging.ERROR)
    return level


def add_to_phase(energy: dict[str, Any], phase: str, kwh: float, co2: float) -> dict[str, Any]:
    """Energy measured outside this process's tracker (the interrupted part of a resumed run, a
    batched head's share of its group) joins ``phase`` — training, in both cases."""
    if "phases_kwh" not in energy:
        return energy
    kwhs, co2s = dict(energy["phases_kwh"]), dict(energy["phases_co2_kg"])
    kwhs[phase], co2s[phase] = kwhs.get(phase, 0.0) + kwh, co2s.get(phase, 0.0) + co2
    return {**energy, "phases_kwh": kwhs, "phases_co2_kg": co2s}


_warm: threading.Thread | None = None


def warm_up() -> None:
    """Starts codecarbon's CPU probe in a background thread, so that it overlaps the imports and
    the run's set-up instead of delaying training: the probe (py-cpuinfo runs a second Python
    interpreter, then a fuzzy match against codecarbon's CPU power table) is most of the
    tracker's start-up, 1.5–3 s on a 2-core machine. codecarbon keeps the result for the process
    (``hardware_cache.get_cached_tdp``), so ``EnergyTracker.start`` reuses it; the measurement
    itself starts there as before. Best effort: any failure leaves codecarbon to probe itself."""
    global _warm
    if _warm is not None:
        return

    def probe() -> None:
        try:
            import codecarbon  # noqa: F401 - sets its logger's level when first imported …

            quiet_codecarbon()  # … so quieten it after, before the probe's warnings
            from codecarbon.core import cpu
            from codecarbon.core.hardware_cache import get_cached_tdp

            get_cached_tdp(cpu)
        except Exception as err:  # noqa: BLE001 - an optimisation, never a failure
            log.debug("codecarbon warm-up failed: %s", err)

    _warm = threading.Thread(target=probe, name="codecarbon-warm-up", daemon=True)
    _warm.start()


def _wait_for_warm_up() -> None:
    if _warm is not None:
        _warm.join()


class EnergyTracker:
    """Wraps ``codecarbon.OfflineEmissionsTracker``; if codecarbon cannot measure on this machine
    the run still completes and the summary records why energy is missing."""

    def __init__(self, enabled: bool, country: str, output_dir: Path,
                 measure_power_secs: float = 5.0) -> None:
        self.enabled, self.country, self.output_dir = enabled, country, Path(output_dir)
        self.measure_power_secs = measure_power_secs
        self._tracker = None
        self.error: str | None = None
        self.phases: dict[str, list[float]] = {}  # phase → [kWh, kg CO₂], measured as tasks
        self._phase: str | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            _wait_for_warm_up()  # one probe, not two racing for codecarbon's cache
            level = quiet_codecarbon()
            from codecarbon import OfflineEmissionsTracker

            self.output_dir.mkdir(parents=True, exist_ok=True)  # codecarbon fails silently if not

            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, output_dir=str(self.output_dir),
                output_file="emissions.csv", log_level=level, save_to_file=True,
                measure_power_secs=self.measure_power_secs, tracking_mode="process",
                allow_multiple_runs=True,  # parallel sweep jobs each keep their own tracker
                project_name="effbench")
            self._tracker.start()
        except Exception as err:  # noqa: BLE001 - measurement must never kill a run
            self.error = f"{type(err).__name__}: {err}"
            log.warning("codecarbon could not start: %s", self.error)
            self._tracker = None

    def phase_start(self, name: str) -> None:
        """Energy of one phase (``train``, ``convert``, …) as a codecarbon task, so that a phase's
        energy goes with its time (``time_s``) in the summary and the compare."""
        if self._tracker is None:
            return
        try:
            # start_task restarts the power counters without a reading: take one first, or the
            # energy since the last periodic reading would be missing from the total.
            getattr(self._tracker, "_measure_power_and_energy", lambda: None)()
            self._tracker.start_task(name)
            self._phase = name
        except Exception as err:  # noqa: BLE001 - measurement must never kill a run
            log.warning("codecarbon could not measure phase %s: %s", name, err)
            self._phase = None

    def phase_stop(self) -> None:
        name, self._phase = getattr(self, "_phase", None), None
        if self._tracker is None or name is None:
            return
        try:
            data = self._tracker.stop_task()
        except Exception as err:  # noqa: BLE001
            log.warning("codecarbon could not measure phase %s: %s", name, err)
            return
        if data is not None:
            kwh, co2 = self.phases.setdefault(name, [0.0, 0.0])
            self.phases[name] = [kwh + float(data.energy_consumed), co2 + float(data.emissions)]

    def _phase_facts(self, kwh: float, co2: float) -> dict[str, Any]:
        """``phases_kwh`` / ``phases_co2_kg`` per phase, ``other`` = what no phase covered."""
        if not self.phases:
            return {}
        out = {"phases_kwh": {k: v[0] for k, v in self.phases.items()},
               "phases_co2_kg": {k: v[1] for k, v in self.phases.items()}}
        out["phases_kwh"]["other"] = max(0.0, kwh - sum(out["phases_kwh"].values()))
        out["phases_co2_kg"]["other"] = max(0.0, co2 - sum(out["phases_co2_kg"].values()))
        return out

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
                    **self._phase_facts(float(data.energy_consumed), float(co2 or 0.0)),
                    "error": None}
        except Exception as err:  # noqa: BLE001
            return {"kwh": None, "co2_kg": None, "country": self.country, "source": "codecarbon",
                    "error": f"{type(err).__name__}: {err}"}

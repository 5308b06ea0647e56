"""scripts/check_dataset.py on generated copies: counts per class/split/patient, leaks, decoding."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT
from tests.data.fakes import write_breakhis, write_chestxray14

spec = importlib.util.spec_from_file_location("check_dataset",
                                              ROOT / "scripts" / "check_dataset.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_breakhis_counts_and_patients(tmp_path, capsys) -> None:
    root = write_breakhis(tmp_path / "b", patients_per_type=2, mags=("40", "100"))
    assert check.main(["breakhis", "--root", str(root), "--decode", "all",
                       "dataset.label=subtype"]) == 0
    out = capsys.readouterr().out
    assert "adenosis" in out and "patients" in out and "no patient in two splits" in out
    assert "decoding: 0 failures" in out
    images = next(line for line in out.splitlines() if line.strip().startswith("total images"))
    assert sum(int(n) for n in images.split()[2:]) == 8 * 2 * 2


def test_undecodable_file_fails_the_check(tmp_path, capsys) -> None:
    """A PNG whose header and end are intact but whose pixel data is damaged passes the setup's
    cheap check; ``--decode`` finds it."""
    root = write_chestxray14(tmp_path / "c")
    png = next((root / "images").iterdir())
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 32] = b"\xff" * 32
    png.write_bytes(bytes(data))
    assert check.main(["chestxray14", "--root", str(root), "--decode", "all"]) == 1
    out = capsys.readouterr().out
    assert "Pleural_Thickening" in out and "decoding: 1 failures" in out and png.name in out


def test_unopenable_file_is_left_out_as_a_run_would(tmp_path) -> None:
    """A file that does not open at all is skipped at setup, as in a run, and counted."""
    root = write_chestxray14(tmp_path / "c")
    bad = next((root / "images").iterdir())
    bad.write_bytes(b"not a png")
    dm = check.build("chestxray14", [f"dataset.root={root}"])
    assert dm.unreadable == [bad] and dm.describe()["skipped_unreadable"] == 1
    assert sum(len(y) for y in dm.labels.values()) == 24 * 2 - 1


def test_missing_data_exits_2(tmp_path, capsys) -> None:
    assert check.main(["brain_mri", "--root", str(tmp_path / "none")]) == 2
    assert "brain_glioma/" in capsys.readouterr().out

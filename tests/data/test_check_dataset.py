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
    root = write_chestxray14(tmp_path / "c")
    next((root / "images").iterdir()).write_bytes(b"not a png")
    assert check.main(["chestxray14", "--root", str(root), "--decode", "all"]) == 1
    out = capsys.readouterr().out
    assert "Pleural_Thickening" in out and "decoding: 1 failures" in out


def test_missing_data_exits_2(tmp_path, capsys) -> None:
    assert check.main(["brain_mri", "--root", str(tmp_path / "none")]) == 2
    assert "brain_glioma/" in capsys.readouterr().out

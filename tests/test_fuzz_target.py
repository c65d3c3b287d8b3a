"""The fuzz target (fuzz/codec_fuzz.py) runs: a few hundred of its cases with every oracle, so
that the target `tox -e asan` runs under the sanitizers cannot rot unnoticed in the plain suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "codec_fuzz.py"


def load_fuzz_module():
    spec = importlib.util.spec_from_file_location("codec_fuzz", FUZZ)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_seeded_run_finds_nothing(tmp_path, capsys):
    fuzz = load_fuzz_module()
    case_file = str(tmp_path / "case")
    assert (
        fuzz.main(["--seed", "7", "--runs", "600", "--seconds", "60", "--case-file", case_file])
        == 0
    )
    out = capsys.readouterr().out
    assert "600 cases" in out
    for kind in ("valid", "mutated", "hostile", "threaded", "headers", "api"):
        assert f"{kind} " in out
    assert int(Path(case_file).read_text()) == 599


def test_a_finding_names_the_case_to_replay(tmp_path, capsys, monkeypatch):
    """A case that fails is reported with the seed and index that reproduce it, and the run
    fails."""
    fuzz = load_fuzz_module()

    def broken(self, rng):
        raise fuzz.Finding("planted")

    monkeypatch.setattr(fuzz.Fuzzer, "case_headers", broken)
    code = fuzz.main(["--seed", "7", "--runs", "50", "--case-file", str(tmp_path / "case")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FINDING: seed 7 case" in out
    assert "--seed 7 --replay" in out

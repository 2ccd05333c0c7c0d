"""The examples run end to end (a few steps each) and produce what they promise."""
import subprocess
import sys
from tests.paths import REPO

ROOT = REPO


def test_mi_gaussian_prints_every_estimator_and_saves_the_plot(tmp_path):
    out = tmp_path / "mi.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "mi_gaussian.py"), "--steps-per-level", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("InfoNCE", "NWJ", "JS", "TUBA", "I_alpha"):
        row = next(line for line in lines if line.startswith(name))
        assert row.count("±") == 5  # a mean and std for each true MI level
    assert out.stat().st_size > 10_000

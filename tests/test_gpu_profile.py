"""benchmarks/gpu_profile.py runs end to end (on the CPU, with --quick shapes).

Machine: bound. The quick profile must run and write its JSON: timings positive, values finite,
prototypes formed. No timing is compared.
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_profile  # noqa: E402


def test_quick_profile_writes_its_json(tmp_path):
    out = tmp_path / "gpu_profile.json"
    assert gpu_profile.main(["--quick", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] and res["what"].startswith("QUICK")  # never mistaken for a profile
    assert set(res["step_ms"]) == {"meanteacher", "brpg", "brpg_sampling"}
    assert all(m["median"] > 0 for m in res["step_ms"].values())
    assert math.isfinite(res["prototype_share_of_brpg_step"])
    assert sum(res["prototypes_per_class"]) > 0  # the timed BRPG step ran with prototypes
    assert res["preset"] == "voc_brpg_classic_366" and res["clustering_s"] > 0

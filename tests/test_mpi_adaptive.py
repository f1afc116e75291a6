"""The user's own inputs and --mode auto under a real mpirun: a folder with a corrupt file, and a step
load (low -> high -> low) that must use both modes, log its switches and answer every input once."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_mpi
from fluid_mpi.model.data import load_split

pytestmark = pytest.mark.mpi


def test_folder_with_a_corrupt_file(ckpts, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    ds = load_split(None, "test").take(12)
    for i, img in enumerate(ds.images):  # black ink on white, larger than 28x28, in colour: as a user's photo
        Image.fromarray(255 - img).resize((84, 84)).convert("RGB").save(folder / f"digit{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--input", str(folder), "--mode", "ht", "-b", "4"], tmp_path,
                  timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    by_name = {p["name"]: p for p in res.predictions}
    assert sorted(by_name) == sorted([f"digit{i:02d}.png" for i in range(12)] + ["broken.png"])
    assert "error" in by_name["broken.png"] and "pred" not in by_name["broken.png"]
    for i in range(12):
        p = by_name[f"digit{i:02d}.png"]
        assert 0 <= p["pred"] <= 9 and 0 < p["confidence"] <= 1 and p["mode"] == "ht" and "label" not in p
    assert sorted(p["index"] for p in res.predictions) == list(range(13))  # every file exactly once
    s = res.summary
    assert s["errors"] == 1 and s["answered"] == s["images"] == 13 and s["accuracy"] is None


@pytest.mark.parametrize("spec,want", [("empty", "no image files"), ("shape", "(5, 7)")])
def test_bad_input_is_one_line_exit_2(ckpts, tmp_path, spec, want):
    if spec == "empty":
        (tmp_path / "empty").mkdir()
        path = tmp_path / "empty"
    else:
        path = tmp_path / "bad.npy"
        np.save(path, np.zeros((5, 7), np.uint8))
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--input", str(path)], tmp_path, timeout=60)
    errors = [line for line in res.stderr.splitlines() if line.startswith("fluid-mpi: error:")]
    assert res.returncode == 2 and len(errors) == 1 and want in errors[0], res.stderr[-1500:]
    assert "Traceback" not in res.stderr


def test_auto_mode_follows_a_step_load(ckpts, tmp_path):
    """300 images/s for 1 s (HA keeps up), a burst at 20,000/s for 0.1 s (its backlog would miss the 20 ms
    latency target in HA), then 300/s again: the coordinator must switch to HT and back, log both
    switches, and answer every input once."""
    n = 3000
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--mode", "auto", "--repeat", "3", "--rate", "300@1,20000@0.1,300",
                      "--seed", "7", "-b", "16", "--latency-ms", "20"], tmp_path, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p["index"] for p in res.predictions) == list(range(n)) and res.torn == 0
    s = res.summary
    assert s["by_mode"]["ha"] > 0 and s["by_mode"]["ht"] > 0 and s["max_backlog"] > 100
    assert {p["mode"] for p in res.predictions} == {"ha", "ht"}
    decisions = [e for e in res.events if e["event"] == "mode_switch"]
    assert decisions[0]["mode"] == decisions[0]["was"] == "ha"  # the first decision is logged too
    switches = [e for e in decisions if e["mode"] != e["was"]]
    assert [e["mode"] for e in switches][:2] == ["ht", "ha"], json.dumps(decisions)[:1500]
    assert all("backlog" in e and "arrival_rate" in e and e["reason"] for e in decisions)
    first_ht = min(p["index"] for p in res.predictions if p["mode"] == "ht")
    assert first_ht > 100  # the low-load start was answered in HA

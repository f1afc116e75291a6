"""`mpirun fluid-mpi infer` in subprocesses: distributed predictions equal the in-process model's."""
import pytest

from conftest import REPO, run_mpi
from helpers import check_against, reference_logits

pytestmark = pytest.mark.mpi
LIMIT = 120


def assert_complete(res, n=LIMIT):
    assert res.returncode == 0, res.stderr
    s = res.summary
    assert s["status"] == "ok" and s["answered"] == n and s["duplicates"] == 0 and s["failures"] == []
    assert sorted(p["index"] for p in res.predictions) == list(range(n))
    assert s["images_per_s"] > 0 and 0 <= s["accuracy"] <= 100 and res.torn == 0
    assert res.events[0]["event"] == "start" and res.events[-1]["event"] == "stop"
    assert res.events[-1]["exit_code"] == 0 and res.events[-1]["answered"] == n


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_fluid_matches_in_process(ckpts, tmp_path, k, mode):
    ckpt = ckpts("fluid", k)
    res = run_mpi(k, ["-c", str(ckpt), "--mode", mode, "--limit", str(LIMIT), "-b", "16"], tmp_path)
    assert_complete(res)
    if mode == "ha":
        ref = reference_logits(ckpt, LIMIT)
        check_against(res.predictions, lambda p: ref[p["index"]])
    else:
        refs = {r: reference_logits(ckpt, LIMIT, (r,)) for r in range(k)}
        check_against(res.predictions, lambda p: refs[p["rank"]][p["index"]])
        assert len({p["rank"] for p in res.predictions}) == k  # every rank classified some batches


@pytest.mark.parametrize("family,k", [("static", 2), ("static", 3), ("dynamic", 2), ("dynamic", 3)])
def test_sliced_matches_in_process(ckpts, tmp_path, family, k):
    ckpt = ckpts(family, k)
    res = run_mpi(k, ["-c", str(ckpt), "--limit", str(LIMIT), "-b", "32"], tmp_path)
    assert_complete(res)
    ref = reference_logits(ckpt, LIMIT)
    check_against(res.predictions, lambda p: ref[p["index"]])


def test_dynamic_width_1_on_spare_ranks(ckpts, tmp_path):
    ckpt = ckpts("dynamic", 2)
    res = run_mpi(2, ["-c", str(ckpt), "--width", "1", "--limit", "40"], tmp_path)
    assert_complete(res, 40)
    ref = reference_logits(ckpt, 40, width=1)
    check_against(res.predictions, lambda p: ref[p["index"]])


def test_fluid_subset_on_fewer_ranks(ckpts, tmp_path):
    ckpt = ckpts("fluid", 3)
    res = run_mpi(2, ["-c", str(ckpt), "--limit", "40"], tmp_path)
    assert_complete(res, 40)
    ref = reference_logits(ckpt, 40, subset=(0, 1))
    check_against(res.predictions, lambda p: ref[p["index"]])


@pytest.mark.parametrize("family,np_", [("static", 3), ("fluid", 3), ("dynamic", 3)])
def test_wrong_np_is_one_line_exit_2(ckpts, tmp_path, family, np_):
    res = run_mpi(np_, ["-c", str(ckpts(family, 2)), "--limit", "10"], tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("fluid-mpi: error:")]
    assert len(errors) == 1 and f"-np {np_}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and res.summary is None


def test_kill_rank_beyond_np_is_an_error(ckpts, tmp_path):
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--kill-rank", "5"], tmp_path, timeout=60)
    assert res.returncode == 2 and "--kill-rank 5: there are only ranks 0..1" in res.stderr


@pytest.mark.parametrize("spec", ["1:melt", "x", "1:kill:-2"])
def test_bad_kill_rank_spec_is_one_line_exit_2(ckpts, tmp_path, spec):
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--kill-rank", spec], tmp_path, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert sum(line.startswith("fluid-mpi: error: --kill-rank") for line in res.stderr.splitlines()) == 1


def test_resume_skips_what_was_answered_and_repairs_a_torn_line(ckpts, tmp_path):
    """A stopped run's predictions (here: the first 24 inputs, then a half-written line) are resumed:
    every input ends up exactly once, the torn line is repaired and counted."""
    ckpt = ckpts("fluid", 2)
    first = run_mpi(2, ["-c", str(ckpt), "--limit", "24", "-b", "8"], tmp_path, name="resume")
    assert first.returncode == 0, first.stderr
    preds = tmp_path / "resume.jsonl"
    kept = preds.read_text()
    res = run_mpi(2, ["-c", str(ckpt), "--limit", "40", "-b", "8", "--resume"], tmp_path, name="resume",
                  keep=kept + '{"index": 24, "lab')
    assert_complete(res, 40)
    s = res.summary
    assert s["resumed"] == 24 and s["answered_here"] == 16 and s["torn_lines_repaired"] == 1
    assert res.torn == 0
    ref = reference_logits(ckpt, 40)
    check_against(res.predictions, lambda p: ref[p["index"]])


def test_bad_checkpoint_exits_2_on_every_rank(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    res = run_mpi(2, ["-c", str(bad)], tmp_path, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert sum(line.startswith("fluid-mpi: error:") for line in res.stderr.splitlines()) == 1


def test_export_dir_runs_each_rank_on_its_own_file(ckpts, tmp_path):
    from fluid_mpi.model.checkpoint import export_parts

    ckpt = ckpts("fluid", 2)
    export_parts(ckpt, tmp_path / "parts")
    res = run_mpi(2, ["-c", str(tmp_path / "parts"), "--limit", "40"], tmp_path)
    assert_complete(res, 40)
    ref = reference_logits(ckpt, 40)
    check_against(res.predictions, lambda p: ref[p["index"]])


def test_warns_when_fault_tolerance_is_off(ckpts, tmp_path):
    """Without --with-ft (and with the venv's MCA files overridden) rank 0 says FT is off and how to
    turn it on."""
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--limit", "20"], tmp_path, ft=False,
                  extra_mpi=["--mca", "mpi_ft_enable", "0", "-x", "OMPI_MCA_mpi_ft_enable=0"])
    assert res.returncode == 0, res.stderr
    assert "fault tolerance is OFF" in res.stderr and "--with-ft ulfm" in res.stderr


def test_plain_mpirun_is_fault_tolerant_with_the_venv_config(ckpts, tmp_path):
    """The README's plain `mpirun -np 2 ... fluid-mpi infer` (no --with-ft): scripts/setup.sh switched
    ULFM on in the venv's MCA files, so there is no warning and a killed rank is survived."""
    from fluid_mpi.cluster.mpirun import find_mpirun

    if not (find_mpirun() or "").startswith(str(REPO / ".venv")):
        pytest.skip("not the venv's Open MPI: its MCA files are not ours")
    res = run_mpi(2, ["-c", str(ckpts("fluid", 2)), "--limit", "64", "-b", "16", "--kill-rank", "1"], tmp_path,
                  ft=False)
    assert res.returncode == 0 and "fault tolerance is OFF" not in res.stderr, res.stderr
    assert res.summary["answered"] == 64 and [f["rank"] for f in res.summary["failures"]] == [1]

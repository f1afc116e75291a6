"""The CLI through click's CliRunner, and --help's import discipline."""
import json
import subprocess
import sys

from click.testing import CliRunner

from fluid_mpi.cli import cli


def test_help_imports_neither_torch_nor_mpi():
    code = ("import sys; from fluid_mpi.cli import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "infer" in out.stdout and "train" in out.stdout


def test_train_eval_export(tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "f.pt"
    res = runner.invoke(cli, ["train", "--family", "fluid", "--limit", "300", "--epochs", "1",
                              "--widths", "4,8,16", "--out", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert "groups 0+1" in res.output and "embedded default" in res.output and ckpt.exists()
    res = runner.invoke(cli, ["eval", str(ckpt), "--json", "--limit", "100"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["family"] == "fluid" and report["parts"] == 2
    assert set(report["accuracy"]["subsets"]) == {"0", "1", "0+1"}
    assert all(0 <= v <= 100 for v in report["accuracy"]["subsets"].values())
    res = runner.invoke(cli, ["export", str(ckpt), "--out-dir", str(tmp_path / "parts")])
    assert res.exit_code == 0 and (tmp_path / "parts" / "part-1.pt").exists()


def test_errors_are_one_line_exit_2(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    for args in (["eval", str(bad)], ["eval", str(tmp_path / "none.pt")],
                 ["train", "--family", "static", "--data-dir", str(tmp_path / "nodata"), "--out", "x.pt"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fluid-mpi: error:"), res.output
    res = runner.invoke(cli, ["train", "--family", "static", "--widths", "1,2", "--out", "x.pt"])
    assert res.exit_code == 2 and "--widths" in res.output


def test_bench_faults_scenario_choices_are_the_bench_s_scenarios():
    """`bench faults --scenario` lists the names without importing the bench (--help stays light)."""
    from fluid_mpi.bench.faults import SCENARIOS
    from fluid_mpi.cli.bench import _scenario_names

    assert _scenario_names() == [sc.name for sc in SCENARIOS]

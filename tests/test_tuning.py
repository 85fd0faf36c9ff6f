"""`qwen3c tune` writes meta_schedule records; `compile --tuning-records` replays them, and the
tuned model still matches HF transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import qwen3c
from qwen3c.cli import main
from qwen3c.compile.tuning import RECORD_FILE, WORKLOAD_FILE
from qwen3c.reference import HFReference
from qwen3c.targets.llvm import host_cpu


@pytest.fixture(scope="module")
def tuning_checkpoint(make_checkpoint):
    """One layer, hidden size 512. Our kernels take the projections, attention, q/k norms and
    residual adds + RMSNorms, so meta_schedule's work is what is left: the first layer's input
    RMSNorm, which at 128 tokens x 512 is slow enough unscheduled (one core, scalar) that even
    a 2-trial search finds a faster schedule; the tiny model's hidden size of 64 was not."""
    return make_checkpoint("tuning", hidden_size=512, intermediate_size=256,
                           num_hidden_layers=1)


@pytest.fixture(scope="module")
def records(tuning_checkpoint, tmp_path_factory):
    """Records of a short search (2 schedules per kernel), float32, through the CLI."""
    output = tmp_path_factory.mktemp("records")
    result = CliRunner().invoke(main, ["tune", str(tuning_checkpoint), "--dtype", "float32",
                                       "--trials", "2", "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "rms_norm" in result.output and "wrote" in result.output
    return output


@pytest.fixture(scope="module")
def winning_records(records, tmp_path_factory):
    """The search's records with each tuned schedule's time set to a nanosecond, so that
    compile replays a tuned schedule of every kernel. Whether a 2-trial search finds a schedule
    faster than the untuned kernel is chance (its candidates ran 0.3x to 23x the untuned time
    here, and beside another test worker one measured 14,000x); the replay's correctness must
    be checked on every run, with the traces a real search wrote."""
    output = tmp_path_factory.mktemp("winning-records")
    (output / WORKLOAD_FILE).write_text((records / WORKLOAD_FILE).read_text())
    lines = []
    for line in (records / RECORD_FILE).read_text().splitlines():
        workload, (trace, run_secs, *rest) = json.loads(line)
        if trace != [[], []] and run_secs:
            run_secs = [1e-9 for _ in run_secs]
        lines.append(json.dumps([workload, [trace, run_secs, *rest]]))
    (output / RECORD_FILE).write_text("\n".join(lines) + "\n")
    return output


def test_tune_writes_a_database_and_a_summary(records):
    summary = json.loads((records / "summary.json").read_text())
    kernels = summary["kernels"]
    assert summary["target"]["cpu"] == host_cpu() and summary["trials_per_kernel"] == 2
    assert kernels and all(k["untuned_us"] > 0 and k["calls"] >= 1 for k in kernels)
    assert any(k["tuned_us"] for k in kernels)
    assert len((records / RECORD_FILE).read_text().splitlines()) > len(kernels)


def test_tuned_model_matches_hf(records, winning_records, tuning_checkpoint, make_artifact):
    artifact = make_artifact(tuning_checkpoint, tuning_records=winning_records)
    tuning = json.loads((artifact / "manifest.json").read_text())["tuning"]
    searched = [k for k in json.loads((records / "summary.json").read_text())["kernels"]
                if k["tuned_us"]]
    assert searched and tuning["applied"] == len(searched) and tuning["failed"] == []
    model = qwen3c.load(artifact)
    reference = HFReference(tuning_checkpoint)
    # Kernels were tuned at 128 tokens; the replay must hold at other counts (and batch 1).
    for length in (1, 7, 130):
        ids = np.random.default_rng(length).integers(0, model.vocab_size, length).tolist()
        ours, exact = model.logits(ids), reference.logits(ids)
        assert np.abs(ours - exact).max() <= 1e-4 * np.abs(exact).max()
    ids = [5, 17, 300, 42]
    assert model.generate(ids, max_new_tokens=16, stop=None).token_ids == \
        reference.greedy(ids, 16)


def test_only_schedules_faster_than_the_untuned_kernel_are_replayed(records, tuning_checkpoint,
                                                                    make_artifact):
    summary = json.loads((records / "summary.json").read_text())["kernels"]
    improved = [k for k in summary if k["tuned_us"] and k["tuned_us"] < k["untuned_us"]]
    tuning = json.loads((make_artifact(tuning_checkpoint, tuning_records=records)
                         / "manifest.json").read_text())["tuning"]
    assert tuning["kernels"] == len(summary)  # each kernel of the model is distinct
    assert tuning["applied"] == len(improved)


def compile_error(checkpoint, tmp_path, *args: str) -> str:
    result = CliRunner().invoke(main, ["compile", str(checkpoint), "--dtype", "float32",
                                       "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    return result.output


def test_records_of_another_cpu_are_refused(records, tuning_checkpoint, tmp_path):
    other = tmp_path / "records"
    other.mkdir()
    for path in records.glob("database_*.json"):
        text = path.read_text().replace(f'"{host_cpu()}"', '"someothercpu"')
        (other / path.name).write_text(text)
    assert "tune for this CPU" in compile_error(tuning_checkpoint, tmp_path,
                                                "--tuning-records", str(other))


def test_missing_or_corrupt_records_are_refused(records, tuning_checkpoint, tmp_path):
    assert "holds no tuning records" in compile_error(tuning_checkpoint, tmp_path,
                                                      "--tuning-records", str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in records.glob("database_*.json"):
        (broken / path.name).write_text(path.read_text()[:200])
    assert "cannot read the tuning records" in compile_error(
        tuning_checkpoint, tmp_path, "--tuning-records", str(broken))


@pytest.mark.parametrize("args, message", [
    (["--target", "cuda"], "cannot be tuned on this host"),
    (["--trials", "0"], "trials must be >= 1"),
])
def test_tune_refuses_what_it_cannot_do(tuning_checkpoint, tmp_path, args, message):
    result = CliRunner().invoke(main, ["tune", str(tuning_checkpoint), "-o", str(tmp_path / "r"),
                                       *args])
    assert result.exit_code == 1 and message in result.output, result.output

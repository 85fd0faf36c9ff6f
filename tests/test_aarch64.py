"""aarch64 artifacts, cross-compiled here and run under qemu-user through TVM's aarch64 runtime.

No aarch64 Python runs here, so ``tests/aarch64/run_artifact.cc`` (a C++ host over TVM's
runtime) prefills a prompt and decodes greedily from the artifact's library and weights; its
logits must match the x86_64 build of the same checkpoint, run by qwen3c's own runtime.
Needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them) and TVM's aarch64
wheels from PyPI (downloaded once into the user's cache).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tvm

import qwen3c
from qwen3c.runtime.artifact import load_params, read_manifest

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
HOST_SOURCE = Path(__file__).parent / "aarch64" / "run_artifact.cc"
PROMPT = [5, 17, 42, 99, 3, 250, 7]
DECODE_STEPS = 8
ELF_MACHINE_AARCH64 = 183

pytestmark = pytest.mark.skipif(
    shutil.which(CROSS_CXX) is None or shutil.which(QEMU) is None,
    reason=f"needs {CROSS_CXX} and {QEMU} (apt-get install g++-aarch64-linux-gnu qemu-user)")


@pytest.fixture(scope="session")
def aarch64_runtime() -> Path:
    """TVM's aarch64 runtime libraries (same versions as installed here) in one folder."""
    versions = {name: importlib.metadata.version(name)
                for name in ("apache-tvm", "apache-tvm-ffi")}
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3c" / (
        "aarch64-runtime-" + "-".join(versions.values()))
    libraries = cache / "lib"
    if not (libraries / "libtvm_runtime.so").exists():
        wheels = cache / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
                        "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                        "--dest", str(wheels),
                        *(f"{name}=={version}" for name, version in versions.items())],
                       check=True)
        libraries.mkdir(parents=True, exist_ok=True)
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.endswith(("/libtvm_runtime.so", "/libtvm_ffi.so")):
                        (libraries / Path(member).name).write_bytes(archive.read(member))
    return libraries


@pytest.fixture(scope="session")
def run_artifact_host(aarch64_runtime, tmp_path_factory) -> Path:
    """tests/aarch64/run_artifact.cc built for aarch64 against TVM's headers."""
    import tvm_ffi

    binary = tmp_path_factory.mktemp("aarch64-host") / "run_artifact"
    include = Path(tvm_ffi.__file__).parent / "include"
    subprocess.run([CROSS_CXX, "-std=c++17", "-O1", f"-I{include}", str(HOST_SOURCE),
                    "-o", str(binary), f"-L{aarch64_runtime}", "-ltvm_runtime", "-ltvm_ffi"],
                   check=True)
    return binary


def run_under_qemu(host: Path, runtime: Path, artifact: Path, work: Path) -> np.ndarray:
    """Logits [1 + DECODE_STEPS, vocab]: the prompt's last position, then each greedy step."""
    directory, manifest = read_manifest(artifact)
    params = load_params(directory, manifest, tvm.cpu())
    params_file, logits_file = work / "params.bin", work / "logits.bin"
    tvm.runtime.save_param_dict_to_file({str(i): p for i, p in enumerate(params)},
                                        str(params_file))
    env = dict(os.environ, QEMU_LD_PREFIX=str(SYSROOT), LD_LIBRARY_PATH=str(runtime))
    done = subprocess.run([QEMU, str(host), str(directory / "model.so"), str(params_file),
                           str(logits_file), str(DECODE_STEPS), *map(str, PROMPT)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    vocab = manifest.model["vocab_size"]
    return np.fromfile(logits_file, dtype=np.float32).reshape(1 + DECODE_STEPS, vocab)


def reference_logits(artifact: Path) -> np.ndarray:
    """The same steps on the x86_64 build, through qwen3c's runtime: a prefill, then greedy
    decode steps (not prefills of growing prompts: a quantized kernel rounds each token's
    activations, so the two need not agree to 1e-4)."""
    with qwen3c.load(artifact) as model:
        seq = model.new_sequence(list(PROMPT), max_new_tokens=DECODE_STEPS + 1)
        try:
            rows = [logits[-1] for _, logits in model.prefill_step([seq])]
            for _ in range(DECODE_STEPS):
                seq.accept(rows[-1])
                rows.append(model.decode_step([seq])[0])
        finally:
            model.kv_cache.remove_sequence(seq.seq_id)
    return np.stack(rows)


@pytest.mark.parametrize("kind, options", [
    ("dense", {}),
    ("dense-q4", {"quant": "q4"}),
    ("moe", {}),
])
def test_aarch64_artifact_runs_under_qemu_like_x86(kind, options, make_checkpoint, make_artifact,
                                                   run_artifact_host, aarch64_runtime, tmp_path):
    checkpoint = make_checkpoint("moe" if kind == "moe" else "tiny", moe=kind == "moe")
    arm = make_artifact(checkpoint, arch="aarch64", **options)
    _, manifest = read_manifest(arm)
    assert (manifest.target.arch, manifest.target.cpu) == ("aarch64", "generic")
    library = (arm / "model.so").read_bytes()
    assert int.from_bytes(library[18:20], "little") == ELF_MACHINE_AARCH64
    with pytest.raises(qwen3c.ArtifactError, match="built for aarch64"):
        qwen3c.load(arm)

    ours = run_under_qemu(run_artifact_host, aarch64_runtime, arm, tmp_path)
    expected = reference_logits(make_artifact(checkpoint, **options))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_aarch64_kernels_use_neon(make_artifact, tiny_checkpoint):
    """The projections are vectorised as 4-lane NEON multiply-adds, not scalar code."""
    library = make_artifact(tiny_checkpoint, arch="aarch64") / "model.so"
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)],
                                 capture_output=True, text=True, check=True).stdout
    vector_fmas = len(re.findall(r"\tfmla\tv\d+\.4s", disassembly))
    assert vector_fmas >= 50, vector_fmas

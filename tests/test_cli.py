"""The user's commands end to end: compile, inspect, run (plain and --chat), demo."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoTokenizer

import qwen3c
from qwen3c.cli import main
from qwen3c.compile.config import load_config


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def checkpoint_elements(model_dir) -> int:
    """How many numbers the checkpoint's safetensors hold (HF saves a tied weight once)."""
    with safe_open(next(model_dir.glob("*.safetensors")), "np") as weights:
        names = weights.keys()  # a safe_open is not iterable
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in names)


@pytest.mark.parametrize("name, moe, overrides", [
    ("count-tied", False, {}),
    ("count-untied-bias", False, {"tie_word_embeddings": False, "attention_bias": True}),
    ("count-moe-sparse", True, {"num_hidden_layers": 4, "decoder_sparse_step": 2,
                                "mlp_only_layers": [3]}),
])
def test_parameter_count_is_the_checkpoints(make_checkpoint, name, moe, overrides):
    """What ``inspect`` reports: the model's parameters, not the artifact's stored elements."""
    model_dir = make_checkpoint(name, moe=moe, **overrides)
    assert load_config(model_dir).parameter_count() == checkpoint_elements(model_dir)


def test_compile_inspect_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "artifact"
    compiled = invoke("compile", tiny_checkpoint, "--target", "llvm", "--dtype", "float32",
                      "-o", out, "--dump-ir", tmp_path / "ir")
    assert "model.so" in compiled.output
    assert sorted(p.name for p in (tmp_path / "ir").iterdir())[-1] == "07-finalize.py"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "llvm" and manifest["dtype"] == "float32"
    assert {"prefill", "decode", "create_paged_kv_cache"} <= set(manifest["entry_points"])
    assert [len(digest) for digest in manifest["weight_files"][0].values()] == [64]

    shown = invoke("inspect", out / "model.so").output
    assert "Qwen3ForCausalLM" in shown and "prefill(" in shown and "float32" in shown
    assert f"parameters    {checkpoint_elements(tiny_checkpoint) / 1e6:.1f} M, " in shown
    assert "layouts       as in the checkpoint" in shown  # float32: no bfloat16 panels
    target = manifest["target"]
    assert f"cpu={target['cpu']}{''.join(' +' + f for f in target['features'])}\n" in shown

    ran = invoke("run", out / "model.so", "--prompt", "def run(", "--max-new-tokens", "6")
    model = qwen3c.load(out)
    expected = model.generate("def run(", max_new_tokens=6)
    assert ran.stdout == expected.text + "\n"
    assert "decode" in ran.stderr


def test_chat_template_matches_transformers(tiny_checkpoint, tiny_model):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is TVM?"}]
    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    for thinking in (True, False):
        ours = tiny_model.tokenizer.apply_chat_template(messages, enable_thinking=thinking)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                        enable_thinking=thinking)
        assert ours == theirs
        assert tiny_model.tokenizer.encode(ours) == hf(ours)["input_ids"]


# Exercises what real chat templates use: namespaces, reversed loops, loop controls, tojson,
# string methods, raise_exception.
RICH_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = messages|length - loop.index0 - 1 %}{%- break %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + m.role) }}{%- endif %}"
    "{%- if m.content.startswith('skip') %}{%- continue %}{%- endif %}"
    "<|im_start|>{{ m.role }}{{ ' (last)' if loop.index0 == ns.last_user }}\n"
    "{{ m.content | tojson }}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_rich_chat_template_matches_transformers(tiny_checkpoint, tmp_path):
    import shutil

    from qwen3c.runtime.tokenizer import Tokenizer

    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": RICH_TEMPLATE}))
    messages = [{"role": "system", "content": "Be brief, \"exact\"."},
                {"role": "user", "content": "skip me"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Ünïcode?"}]
    ours = Tokenizer(tmp_path / "ckpt").apply_chat_template(messages)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "(last)" in ours and "skip me" not in ours
    with pytest.raises(qwen3c.RequestError, match="unknown role"):
        Tokenizer(tmp_path / "ckpt").apply_chat_template([{"role": "tool", "content": "x"}])


def test_run_chat(make_artifact, tiny_checkpoint):
    artifact = make_artifact(tiny_checkpoint)
    ran = invoke("run", artifact, "--chat", "--prompt", "hello", "--max-new-tokens", "4",
                 "--temperature", "0.7", "--seed", "1")
    model = qwen3c.load(artifact)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                                 enable_thinking=False)
    expected = model.generate(prompt, max_new_tokens=4, temperature=0.7, seed=1)
    assert ran.stdout == expected.text + "\n"


def test_bench_writes_a_table_and_json(make_artifact, tiny_checkpoint, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    shown = invoke("bench", make_artifact(tiny_checkpoint), "--prompt-lengths", "8,16",
                   "--decode-tokens", "4", "--runs", "1", "--vs-hf", tiny_checkpoint,
                   "--json", out, "--plot", plot).output
    assert "prefill-16 tok/s" in shown and "ttft-8 ms" in shown and "qwen3c/hf-eager" in shown
    rows = json.loads(out.read_text())["rows"]
    assert {(r["engine"], r["metric"], r["unit"]) for r in rows} == {
        (engine, metric, unit) for engine in ("qwen3c", "hf-eager")
        for metric, unit in (("decode", "tok/s"), ("prefill-8", "tok/s"),
                             ("prefill-16", "tok/s"), ("ttft-8", "ms"), ("ttft-16", "ms"),
                             ("peak-rss", "GB"))}
    assert all(r["value"] > 0 for r in rows)
    value = {(r["engine"], r["metric"]): r["value"] for r in rows}
    for engine in ("qwen3c", "hf-eager"):  # time to first token is the prefill time
        assert value[engine, "ttft-16"] == pytest.approx(16e3 / value[engine, "prefill-16"])
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1000, 400)  # width, height: 10x4 in at 100 dpi


FAKE_LLAMA_BENCH = """#!{python}
# Stands in for llama-bench: prints its JSON lines with set figures (round r's decode rate is
# RATES[r] after each context of -d, prefill 10x that) and logs each call (the test logs
# qwen3c's passes there too), to test how `qwen3c bench` drives it.
import json, pathlib, sys
RATES = [10.0, 30.0, 20.0]
log = pathlib.Path(sys.argv[0] + ".calls")
calls = [c for c in log.read_text().splitlines() if c != "qwen3c"] if log.exists() else []
with log.open("a") as out:
    out.write(" ".join(sys.argv[1:]) + "\\n")
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
rate = RATES[len(calls) // 2]  # each round: a decode call, then a prefill call
if args["-p"] == "0":
    for depth in args["-d"].split(","):
        print(json.dumps({{"n_prompt": 0, "n_depth": int(depth), "samples_ts": [rate]}}))
else:
    for n in args["-p"].split(","):
        print(json.dumps({{"n_prompt": int(n), "samples_ts": [rate * 10]}}))
"""


def test_bench_alternates_rounds_with_llama_cpp(make_artifact, tiny_checkpoint, tmp_path,
                                                monkeypatch):
    from qwen3c.runtime import bench

    fake = tmp_path / "llama-bench"
    log = tmp_path / "llama-bench.calls"
    timed = bench.bench_qwen3c

    def logged(*args, **kwargs):  # qwen3c's passes go into the same log as llama-bench's calls
        with log.open("a") as calls:
            calls.write("qwen3c\n")
        return timed(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_qwen3c", logged)
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    out = tmp_path / "bench.json"
    shown = invoke("bench", make_artifact(tiny_checkpoint), "--prompt-lengths", "4,8",
                   "--decode-tokens", "2", "--decode-contexts", "32,48", "--runs", "1",
                   "--rounds", "3", "--vs-llama-cpp", fake, "--gguf", tmp_path / "m.gguf",
                   "--json", out).output
    assert "median of 3 rounds with llama.cpp" in shown and "qwen3c/llama.cpp" in shown
    turns = log.read_text().splitlines()
    assert [turn == "qwen3c" for turn in turns] == [True, False, False] * 3  # they take turns
    calls = [turn for turn in turns if turn != "qwen3c"]
    assert len(calls) == 6 and all("-r 1" in call for call in calls)
    assert all("-d 32,48" in call for call in calls[::2])  # the decode calls
    value = {(r["engine"], r["metric"]): r["value"] for r in json.loads(out.read_text())["rows"]}
    assert value["llama.cpp", "decode"] == 20.0  # the median of the rounds' 10, 30, 20
    assert value["llama.cpp", "decode-at-48"] == 20.0
    assert value["qwen3c", "decode-at-48"] > 0
    assert value["llama.cpp", "prefill-8"] == 200.0
    assert value["qwen3c", "decode"] > 0 and value["qwen3c", "peak-rss"] > 0


@pytest.mark.parametrize("contexts, message", [("0", "positive integers"),
                                               ("32,x", "positive integers"),
                                               ("1000000", "positions")])
def test_bench_refuses_decode_contexts_it_cannot_run(make_artifact, tiny_checkpoint, contexts,
                                                     message):
    ran = CliRunner().invoke(main, ["bench", str(make_artifact(tiny_checkpoint)), "--runs", "1",
                                    "--decode-tokens", "2", "--decode-contexts", contexts])
    assert ran.exit_code == 2 and message in ran.output
    assert "Traceback" not in ran.output


def test_bench_vs_llama_cpp_refuses_missing_inputs(make_artifact, tiny_checkpoint, tmp_path):
    artifact = make_artifact(tiny_checkpoint)
    alone = CliRunner().invoke(main, ["bench", str(artifact), "--vs-llama-cpp", "llama-bench"])
    assert alone.exit_code == 2 and "--gguf" in alone.output
    missing = CliRunner().invoke(main, ["bench", str(artifact), "--runs", "1",
                                        "--decode-tokens", "2", "--prompt-lengths", "4",
                                        "--vs-llama-cpp", str(tmp_path / "llama-bench"),
                                        "--gguf", str(tmp_path / "m.gguf")])
    assert missing.exit_code == 1 and "llama-bench not found" in missing.output
    assert "Traceback" not in missing.output


def test_demo(tmp_path):
    shown = invoke("demo", "--workdir", tmp_path).output
    assert "greedy tokens identical" in shown


def test_demo_moe_shows_the_router_table(tmp_path):
    shown = invoke("demo", "--moe", "--workdir", tmp_path).output
    assert "greedy tokens identical" in shown
    assert "busiest experts" in shown


def test_run_router_stats(make_checkpoint, make_artifact, tmp_path):
    artifact = make_artifact(make_checkpoint("moe-cli", moe=True))
    out = tmp_path / "router.json"
    ran = invoke("run", artifact, "--prompt", "def f(x):", "--max-new-tokens", "4",
                 "--router-stats", "--router-stats-json", out)
    assert "busiest experts" in ran.stdout
    layers = json.loads(out.read_text())
    assert [entry["layer"] for entry in layers] == [0, 1, 2]
    prompt_tokens = len(qwen3c.load(artifact).tokenizer.encode("def f(x):"))
    # every prompt token plus the 3 decoded inputs (the 4th token is sampled, never fed)
    assert all(sum(e["counts"]) == (prompt_tokens + 3) * 2 for e in layers)


def test_interactive_chat_streams_answers(make_artifact, tiny_checkpoint):
    artifact = make_artifact(tiny_checkpoint)
    ran = subprocess.run([sys.executable, "-m", "qwen3c.cli", "run", str(artifact), "--chat",
                          "--max-new-tokens", "6"], input="hello\n/exit\n", text=True,
                         capture_output=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    model = qwen3c.load(artifact)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                                 enable_thinking=False)
    expected = model.generate(prompt, max_new_tokens=6).text
    assert ran.stdout == f"> {expected}\n> "

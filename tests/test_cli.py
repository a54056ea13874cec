"""The glufx command line (glufx/cli.py) end to end on a tiny checkpoint: quantize, eval, report, bench,
and the errors a user gets for bad arguments (each names the fix; exit codes a script can rely on)."""
import json
import subprocess
import sys

import pytest

import glufx
from glufx.cli import EXIT_UNSUPPORTED, EXIT_USAGE, main

from conftest import DATA, tiny_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_checkpoint(root / "fp")
    texts = ["The history of the city begins with a small fort on the river. It grew into a town.",
             "A cat sat on the mat.\nIt was a sunny day, and the children played outside."] * 8
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return root


def _quantize(workdir, *extra):
    return main(["quantize", str(workdir / "fp"), "--calib", str(workdir / "calib.jsonl"), "--out", str(workdir / "q"),
                 "--num-samples", "8", "--seq-len", "32", "--quiet", "--overwrite", *extra])


def test_quantize_eval_report_bench(workdir, capsys):
    assert _quantize(workdir, "--granularity", "static") == 0
    loaded = glufx.load(workdir / "q")
    assert loaded.glufx_plan.int8_param_share() > 0.5
    assert all(m.granularity == "static" for m in loaded.glufx_plan.modules.values() if m.action == "int8")

    tasks = "wikitext,piqa" if _has_lm_eval() else "wikitext"
    assert main(["eval", str(workdir / "fp"), str(workdir / "q"), "--tasks", tasks, "--data-dir", str(DATA),
                 "--limit", "4", "--windows", "2", "--seq-len", "64", "--quiet"]) == 0
    results = json.loads((workdir / "q" / "glufx_eval.json").read_text())
    rows = results["results"] if "results" in results else results
    assert len(rows) == 2  # FP and glufx side by side
    for res in rows.values():
        assert res["wikitext"]["perplexity"] > 1
    assert (workdir / "q" / "glufx_eval.md").exists()

    pytest.importorskip("matplotlib")
    assert main(["report", str(workdir / "q")]) == 0
    report = (workdir / "q" / "report.md").read_text()
    assert "## Evaluation" in report and "spike_heatmap.png" in report

    assert main(["bench", str(workdir / "q"), "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1",
                 "--compiled"]) == 0
    out = capsys.readouterr().out
    assert "| FP32 |" in out and "| glufx |" in out and "| glufx compiled decode |" in out


def _has_lm_eval():
    try:
        import lm_eval  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("argv,needle", [
    (["eval", "no/such/model", "--tasks", "wikitext"], "no such file or directory"),
    (["eval", "{fp}", "--tasks", "wikitext,nosuchtask"], "unknown task"),
    (["eval", "{fp}", "--tasks", "piqa"], "--data-dir"),
    (["quantize", "{fp}", "--calib", "missing.jsonl", "--out", "{tmp}/x"], "--calib 'missing.jsonl' does not exist"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--target", "-1"], "target must be a positive"),
    (["report", "{fp}"], "glufx_plan.json"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--format", "compressed-tensors"], "--rotation off"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--format", "compressed-tensors",
      "--granularity", "per_sequence"], "--granularity per_token"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--format", "compressed-tensors",
      "--granularity", "static"], "--qfep off, or --drop-prefix"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--format", "compressed-tensors",
      "--granularity", "static", "--qfep", "off", "--fp-weights", "int8"], "drop --fp-weights"),
    (["quantize", "{fp}", "--calib", "{calib}", "--out", "{tmp}/x", "--drop-prefix"], "applies to --format"),
    (["bench", "{fp}"], "not a glufx model directory"),
])
def test_bad_arguments_name_the_fix(workdir, tmp_path, capsys, argv, needle):
    argv = [a.format(fp=workdir / "fp", calib=workdir / "calib.jsonl", tmp=tmp_path) for a in argv]
    assert main(argv) == EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_quantize_to_compressed_tensors(workdir, tmp_path):
    out = tmp_path / "ct"
    assert main(["quantize", str(workdir / "fp"), "--calib", str(workdir / "calib.jsonl"), "--out", str(out),
                 "--num-samples", "8", "--seq-len", "32", "--quiet", "--format", "compressed-tensors",
                 "--granularity", "static", "--drop-prefix"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer_config.json").exists()  # an engine needs the tokenizer beside the weights


def test_a_model_without_glu_exits_with_its_own_code(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "c.txt").write_text("Some calibration text. " * 200)
    code = main(["quantize", str(tmp_path / "gpt2"), "--calib", str(tmp_path / "c.txt"), "--out", str(tmp_path / "q"),
                 "--num-samples", "2", "--seq-len", "16", "--quiet"])
    assert code == EXIT_UNSUPPORTED
    assert "no GLU block" in capsys.readouterr().err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "glufx.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("quantize", "eval", "report", "bench"):
        assert cmd in res.stdout

"""glufx.eval.zero_shot: the shipped lm-eval tasks on the real data files, a tiny model, a small real BPE tokenizer.

The key checks are exact: the harness's per-choice loglikelihoods equal a hand computation with the model, and a
QFeP model whose prefix is just BOS scores exactly what the plain model scores with BOS.
"""
import json

import pytest
import torch

from conftest import DATA, TINY, tiny_tokenizer

from glufx.eval import TASKS, markdown_table, wikitext_perplexity, write_results, zero_shot
from glufx.prefix import PrefixedLM, compute_prefix_kv

LIMIT = 4
ACC_NORM = {"piqa", "hellaswag", "arc_easy"}  # the built-in tasks that report acc_norm


def make_model(tokenizer):
    """conftest's tiny llama with the tokenizer's vocabulary and room for a boolq passage."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 2048})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(512)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def plain(model, tokenizer):
    pytest.importorskip("lm_eval")
    return zero_shot(model, tokenizer, data_dir=DATA, limit=LIMIT, progress=False, bootstrap_iters=100,
                     log_samples=True)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), the context encoded with BOS."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def lines(rel: str) -> list[str]:
    return (DATA / rel).read_text(encoding="utf-8").splitlines()[:LIMIT]


def test_every_task_reports_the_builtin_metrics(plain):
    assert set(plain) == set(TASKS) | {"harness"}
    assert plain["harness"]["n"] == {t: LIMIT for t in TASKS}
    assert plain["harness"]["lm_eval"]
    for task in TASKS:
        metrics = plain[task]
        expected = {"acc", "acc_stderr"} | ({"acc_norm", "acc_norm_stderr"} if task in ACC_NORM else set())
        if task == "lambada":
            expected |= {"perplexity", "perplexity_stderr"}
            assert metrics["perplexity"] > 1
        assert set(metrics) == expected, task
        assert all(0 <= metrics[k] <= 1 for k in ("acc", "acc_norm") if k in metrics)
        samples = plain["harness"]["samples"][task]
        n_choices = {"lambada": 1, "piqa": 2, "winogrande": 2, "boolq": 2, "hellaswag": 4, "arc_easy": 4}[task]
        assert [len(s["loglikelihoods"]) for s in samples] == [n_choices] * LIMIT


def test_loglikelihoods_equal_a_hand_computation(plain, model, tokenizer):
    """piqa's prompt and winogrande's partial evaluation (two contexts, one continuation), scored by hand."""
    got = {s["doc_id"]: s["loglikelihoods"] for s in plain["harness"]["samples"]["piqa"]}
    for i, line in enumerate(lines("piqa/valid.jsonl")):
        d = json.loads(line)
        ref = [loglikelihood(model, tokenizer, f"Question: {d['goal']}\nAnswer:", " " + d[s]) for s in ("sol1", "sol2")]
        assert got[i] == pytest.approx(ref, rel=1e-6, abs=1e-4)  # float32 sums: rounding scales with the magnitude
    got = {s["doc_id"]: s["loglikelihoods"] for s in plain["harness"]["samples"]["winogrande"]}
    for i, line in enumerate(lines("winogrande/dev.jsonl")):
        d = json.loads(line)
        head, rest = d["sentence"].split("_", 1)
        ref = [loglikelihood(model, tokenizer, head + d[o], " " + rest.strip()) for o in ("option1", "option2")]
        assert got[i] == pytest.approx(ref, rel=1e-6, abs=1e-4)  # float32 sums: rounding scales with the magnitude
    # the labels come from their own file
    assert [s["target"] for s in plain["harness"]["samples"]["piqa"]] == [int(y) for y in lines("piqa/valid-labels.lst")]


def test_prefixed_model_scores_like_the_plain_model_with_bos(plain, model, tokenizer):
    """A QFeP model holds BOS in its prefix and takes input without it: with the prefix [BOS] it is the plain model."""
    prefixed = PrefixedLM(model, compute_prefix_kv(model, [tokenizer.bos_token_id]))
    # batch_size 3: right-padded batches, the BOS column dropped for every row
    res = zero_shot(prefixed, tokenizer, data_dir=DATA, limit=LIMIT, batch_size=3, progress=False, bootstrap_iters=0,
                    log_samples=True)
    for task in TASKS:
        ours = {s["doc_id"]: s["loglikelihoods"] for s in res["harness"]["samples"][task]}
        ref = {s["doc_id"]: s["loglikelihoods"] for s in plain["harness"]["samples"][task]}
        assert ours.keys() == ref.keys()
        for i in ref:
            assert ours[i] == pytest.approx(ref[i], rel=1e-6, abs=1e-4), task
        assert res[task]["acc"] == plain[task]["acc"]


def test_wikitext_perplexity_scores_prefixed_like_plain(model, tokenizer):
    prefixed = PrefixedLM(model, compute_prefix_kv(model, [tokenizer.bos_token_id]))
    ppl = [wikitext_perplexity(m, tokenizer, windows=2, seq_len=64, progress=False)["perplexity"]
           for m in (model, prefixed)]
    assert ppl[0] > 1 and ppl[1] == pytest.approx(ppl[0], rel=1e-5)


def test_hellaswag_restores_lm_evals_query():
    pytest.importorskip("lm_eval")
    from glufx.eval.tasks.utils import hellaswag

    docs = hellaswag(DATA)["validation"]
    assert len(docs) == 10042
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b "he", capitalized
    assert docs[0]["choices"][3] == "starts pulling up roofing on a roof." and docs[0]["label"] == 3
    wikihow = next(d for d in docs if d["query"].startswith("Family Life: How to entertain a toddler."))
    assert "[" not in wikihow["query"] and wikihow["query"].endswith(".")  # finished sentence, tags removed


def test_bad_arguments_fail_before_the_model_runs(tmp_path, model, tokenizer):
    with pytest.raises(ValueError, match="available: .*piqa"):
        zero_shot(model, tokenizer, ["piqa", "mmlu"], data_dir=DATA)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="valid-labels.lst not found; data_dir must hold .*arc-easy"):
        zero_shot(model, tokenizer, ["piqa"], data_dir=tmp_path)


def test_write_results_side_by_side(tmp_path):
    fp = {"piqa": {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.71, "acc_norm_stderr": 0.01},
          "harness": {"lm_eval": "x", "limit": None, "n": {"piqa": 1838}, "samples": {"piqa": []}}}
    q = {"piqa": {"acc": 0.69, "acc_stderr": 0.01, "acc_norm": 0.7, "acc_norm_stderr": 0.01},
         "lambada": {"perplexity": 12.5, "acc": 0.5}, "harness": {"lm_eval": "x"}}
    write_results({"FP32": fp, "glufx": q}, tmp_path / "r.json", tmp_path / "r.md")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["glufx"]["lambada"]["perplexity"] == 12.5
    assert "samples" not in doc["harness"]["FP32"] and doc["harness"]["FP32"]["n"] == {"piqa": 1838}
    table = (tmp_path / "r.md").read_text().splitlines()
    assert table[0] == "| model | piqa acc | piqa acc_norm | lambada perplexity | lambada acc |"
    assert table[2] == "| FP32 | 0.7000 ± 0.0100 | 0.7100 ± 0.0100 | - | - |"
    assert table[3].startswith("| glufx | 0.6900 ± 0.0100 |") and table[3].endswith("| 12.5000 | 0.5000 |")
    write_results(fp, tmp_path / "one.json")  # a single result set is labelled "model"
    assert list(json.loads((tmp_path / "one.json").read_text())["results"]) == ["model"]
    assert markdown_table({"m": fp}).count("\n") == 2

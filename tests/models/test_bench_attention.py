"""`python -m kvxfer.bench.attention` on small cases: one row per case, every variant timed
(the bench itself checks the new ops against the previous implementation before timing)."""

import json

from kvxfer.bench import attention


def test_bench_attention_rows(capsys):
    attention.main(["--shapes", "tiny-qwen3", "--dtypes", "float32", "bfloat16", "--prefill", "40",
                    "--chunked", "24+9", "--decode-batch", "3", "--decode-context", "50", "--mixed", "4",
                    "--repeats", "1", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    cases = (("prefill", 1, 40, 40), ("chunked", 1, 33, 9), ("decode", 3, 50, 1),
             ("mixdec", 4, "64-288", 1), ("mixpre", 1, "64-256", "=ctx"))
    assert [(r["dtype"], r["case"], r["batch"], r["context"], r["new_tokens"]) for r in rows] == [
        (dtype, *case) for dtype in ("float32", "bfloat16") for case in cases
    ]
    assert all(r[k] > 0 for r in rows for k in ("old", "new", "sdpa_bound"))


def test_bench_linear_rows(capsys):
    attention.main(["--linear", "2", "130", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["weight"], r["rows"]) for r in rows] == [([6144, 1024], 2), ([6144, 1024], 130),
                                                       ([1024, 3072], 2), ([1024, 3072], 130)]
    assert all(r["bfloat16_ms"] > 0 and r["float32_ms"] > 0 for r in rows)


def test_bench_model_profile(capsys):
    attention.main(["--model", "tiny-qwen3", "--dtypes", "float32", "--prefill", "20", "--decode-batch", "2",
                    "--decode-context", "30", "--profile", "3"])
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("# tiny-qwen3")]
    assert [t.split(":")[0] for t in titles] == ["# tiny-qwen3 float32 batch 1 context 20 new 20",
                                                 "# tiny-qwen3 float32 batch 2 context 30 new 1"]
    ops = [line for line in out.splitlines() if line.startswith("  aten::") and line.endswith("calls")]
    assert len(ops) == 2 * 3  # the top 3 ops of each step, whichever they are on this machine

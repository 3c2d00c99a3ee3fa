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

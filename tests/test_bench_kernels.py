"""Smoke test of bench.kernels --quick: it runs every op and writes the JSON and markdown it promises."""
import json

from bench import kernels as bench_kernels


def test_quick_run_writes_report(tmp_path):
    bench_kernels.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert {"device", "torch", "triton", "quick", "batch", "tokens", "context_k", "target_k", "copy_gbps",
            "results"} <= report.keys()
    assert report["quick"] is True and report["copy_gbps"] > 0
    rows = {(r["op"], r["size"], r["pass"]) for r in report["results"]}
    sizes = bench_kernels.QUICK["sizes"]
    assert rows == {(op, size, p) for size in sizes for op, p in [
        ("pack_tokens", "fwd"), ("pack_tokens", "fwd+bwd"), ("masked_l1_loss", "fwd"),
        ("masked_l1_loss", "fwd+bwd"), ("rope", "fwd"), ("rope", "fwd+bwd"), ("ema", "update")]}
    for r in report["results"]:
        assert {"dim", "bytes", "ms", "gbps", "pct_of_copy", "speedup_vs_eager", "speedup_vs_compiled",
                "max_abs_diff_vs_eager"} <= r.keys()
        assert set(r["ms"]) == {"triton", "eager", "compiled"} and r["ms"]["triton"] > 0 and r["bytes"] > 0
        assert r["max_abs_diff_vs_eager"] < 0.1
    assert (tmp_path / "kernels.md").read_text().count("\n| ") == len(report["results"]) + 1


def test_each_row_is_printed_and_written_as_it_is_measured(tmp_path, monkeypatch, capsys):
    on_disk = []
    real_write = bench_kernels.write_results

    def write_and_count(out, name, report, table):
        paths = real_write(out, name, report, table)
        on_disk.append(len(json.loads(paths["json"].read_text())["results"]))
        return paths

    monkeypatch.setattr(bench_kernels, "write_results", write_and_count)
    report = bench_kernels.main(["--quick", "--out", str(tmp_path)])
    assert on_disk == list(range(1, len(report["results"]) + 1))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(printed) == len(report["results"]) + 1  # the column line, then one line per row
    assert all(r["ms"]["compiled"] is None for r in report["results"])  # compiled references are opt-in

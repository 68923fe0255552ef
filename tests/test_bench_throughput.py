"""``bench/throughput.py`` for real, against the replica simulator: a short run at concurrency 4
counts the tokens the simulator reports in usage, its tokens/s is those tokens over the run's wall
time, and ``fortress cost --throughput FILE`` prices with it. About 4 s."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, Proc, free_port, sim_argv, wait_http
from typer.testing import CliRunner

from fortress.cli.main import app
from fortress.deploy.pricing import load_prices

EXAMPLES = ROOT / "examples"
TOKENS = 50
ITL = 0.01


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("throughput")
    port = free_port()
    sim = Proc(sim_argv(port, "m", "--itl", str(ITL), "--tokens", str(TOKENS)), tmp / "sim.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        out = tmp / "throughput.json"
        argv = [PYTHON, str(ROOT / "bench" / "throughput.py"), "--url", f"http://127.0.0.1:{port}"]
        argv += ["--model", "m", "--concurrency", "4", "--seconds", "2", "--max-tokens", "200"]
        done = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        data = json.loads(out.read_text())
        data["_file"] = str(out)
        data["_stdout"] = done.stdout
        return data
    finally:
        sim.stop()


def test_the_bench_counts_the_tokens_usage_reports(measured: dict[str, object]) -> None:
    assert measured["concurrency"] == 4 and measured["model"] == "m" and measured["errors"] == 0
    requests, tokens, elapsed = measured["requests"], measured["output_tokens"], measured["elapsed_s"]
    assert isinstance(requests, int) and isinstance(tokens, int) and isinstance(elapsed, float)
    assert tokens == requests * TOKENS  # the simulator answers TOKENS tokens each time
    assert elapsed >= 2.0
    assert measured["tokens_per_second"] == pytest.approx(tokens / elapsed)
    # 4 clients, each answer at best TOKENS tokens in (TOKENS - 1) gaps of ITL: at most ~408/s
    ceiling = 4 * TOKENS / ((TOKENS - 1) * ITL)
    assert 0.3 * ceiling < measured["tokens_per_second"] <= ceiling
    assert str(measured["measured_at"]).startswith("20")
    assert "output tokens/s at concurrency 4" in str(measured["_stdout"])


def test_cost_prices_tokens_with_the_measured_throughput(measured: dict[str, object]) -> None:
    path = str(measured["_file"])
    tps = float(measured["tokens_per_second"])  # type: ignore[arg-type]
    config = str(EXAMPLES / "aws-always-on.yaml")
    result = CliRunner().invoke(app, ["cost", "-c", config, "--throughput", path, "--json"])
    assert result.exit_code == 0, result.output
    (pool,) = json.loads(result.stdout)["pools"]
    hour = load_prices().ec2_hour("g5.48xlarge")
    assert pool["throughput_tokens_per_second"] == pytest.approx(tps)
    assert pool["usd_per_million_tokens"] == pytest.approx(hour / (tps * 3600) * 1e6)
    assert pool["throughput_source"].startswith(f"measured: {path} (model m, concurrency 4")
    table = CliRunner().invoke(app, ["cost", "-c", config, "--throughput", f"qwen2.5-72b={path}"])
    assert table.exit_code == 0, table.output
    assert "measured:" in table.stdout and f"{tps:,.4g} tokens/s" in table.stdout


def test_a_server_that_does_not_answer_exits_1(tmp_path: Path) -> None:
    argv = [PYTHON, str(ROOT / "bench" / "throughput.py"), "--url", f"http://127.0.0.1:{free_port()}"]
    done = subprocess.run(
        [*argv, "--model", "m", "--seconds", "0.2", "--concurrency", "1"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "no request completed" in done.stderr

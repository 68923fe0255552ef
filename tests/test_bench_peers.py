"""``bench/peers.py``: its report computes the targets from the medians over rounds (a slow
round does not decide them), fails a run that lost audit records or had errors, says when
LiteLLM was left out; the proxies it starts are configured as the docs say; ``--write-docs``
refuses to touch anything outside its section. Under a second: no proxy is started."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import peers


def proxy(cpu_us: list[float], *, fortress: bool = False, errors: int = 0) -> dict[str, Any]:
    return {
        "what": "w",
        "cpu_us": cpu_us,
        "rps": [1000.0] * len(cpu_us),
        "busy": [0.99] * len(cpu_us),
        "others_on_core": [0.0] * len(cpu_us),
        "errors": errors,
        "answer": "the upstream's, unchanged",
        "fortress": fortress,
        "threads": [
            {"event loop": c * 0.8, "audit-journal": c * 0.1, "audit-shipper": c * 0.1} for c in cpu_us
        ],
    }


def results(all_us: list[float], litellm_us: list[float] | None, **kw: Any) -> dict[str, Any]:
    ps = {
        "direct": proxy([8.0, 8.0, 8.0]),
        "nginx": proxy([20.0, 20.0, 20.0]),
        "fortress": proxy([90.0, 90.0, 90.0], fortress=True),
        "fortress-all": proxy(all_us, fortress=True, errors=kw.get("errors", 0)),
    }
    if litellm_us is not None:
        ps["litellm"] = proxy(litellm_us)
    return {
        "machine": {
            "commit": "abc1234",
            "cpu": "CPU",
            "cores": 2,
            "kernel": "6",
            "python": "3.11",
            "stack": "uvicorn",
            "nginx": "1",
            "wrk": "4",
            "loadavg": "0 0 0",
        },
        "date": "2026-12-02 00:00 UTC",
        "plan": {"rounds": len(all_us), "round_s": 8.0, "conns": 32},
        "litellm": {"version": peers.LITELLM_VERSION}
        if litellm_us is not None
        else {"skipped": "--skip-litellm"},
        "proxies": ps,
        "audit_records": kw.get("records", 1000),
        "audit_expected": 1000,
        "other_cpu": {"share": 0.0, "proxy_core_share": 0.0},
        "fortress_workers_setting": True,
        "cores": {"proxy": 1, "load": 0},
        "seconds": 200.0,
    }


def verdicts(r: dict[str, Any]) -> dict[str, str]:
    _, checks = peers.report(r, "python bench/peers.py")
    return {name: result for name, _, result in checks}


CPU = "Fortress, everything on: CPU per request"
RATIO = "LiteLLM's CPU per request / Fortress everything-on's"
ERRORS = "Fortress: wrk errors and non-2xx answers"
AUDIT = "Fortress, everything on: an audit record per request answered"


def test_targets_come_from_the_medians_over_rounds() -> None:
    # One slow round each way: the medians (140 µs, 12,000 µs: 86x) pass; the means would not.
    r = results([140.0, 135.0, 400.0], [12_000.0, 2_000.0, 12_500.0])
    assert verdicts(r) == {CPU: "PASS", RATIO: "PASS", ERRORS: "PASS", AUDIT: "PASS"}
    body, checks = peers.report(r, "python bench/peers.py")
    assert ("86x (≥ 80x)" in dict((a, b) for a, b, _ in checks)[RATIO]) and "**140 µs**" in body
    assert "7.00x" in body  # fortress-all / nginx: 140 / 20


def test_each_target_fails_on_its_own() -> None:
    assert verdicts(results([151.0] * 3, [20_000.0] * 3))[CPU] == "FAIL"
    assert verdicts(results([140.0] * 3, [11_000.0] * 3))[RATIO] == "FAIL"  # 79x
    assert verdicts(results([140.0] * 3, [12_000.0] * 3, errors=1))[ERRORS] == "FAIL"
    assert verdicts(results([140.0] * 3, [12_000.0] * 3, records=999))[AUDIT] == "FAIL"


def test_litellm_left_out_is_said_not_passed() -> None:
    r = results([140.0] * 3, None)
    body, _ = peers.report(r, "python bench/peers.py --skip-litellm")
    assert verdicts(r)[RATIO] == "SKIPPED"
    assert "LiteLLM was not measured (--skip-litellm)" in body


def test_the_proxies_are_configured_as_documented(tmp_path: Path) -> None:
    conf = yaml.safe_load(peers.write_litellm_config(tmp_path, 4321).read_text())
    (entry,) = conf["model_list"]
    assert entry["model_name"] == peers.MODEL
    assert entry["litellm_params"]["model"] == f"openai/{peers.MODEL}"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:4321/v1"
    assert conf["general_settings"] == {"master_key": peers.LITELLM_KEY}  # no database
    argv = peers.litellm_argv(Path("litellm"), tmp_path / "litellm.yaml", 4000)
    assert argv[argv.index("--num_workers") + 1] == "1" and "DATABASE_URL" in argv
    nginx = peers.write_nginx_proxy(tmp_path, 4001, 4321).read_text()
    for line in ("worker_processes 1;", "access_log off;", "keepalive 64;", "proxy_http_version 1.1;"):
        assert line in nginx
    assert "server 127.0.0.1:4321;" in nginx and "listen 127.0.0.1:4001;" in nginx
    assert peers.fortress_argv("fortress", tmp_path / "f.yaml", 4002, True)[:2] == [
        "env",
        "FORTRESS__SERVER__WORKERS=1",
    ]


@pytest.mark.parametrize(
    ("after", "problem"),
    [
        ("a\n<!-- peers:start -->\nnew figures\n<!-- peers:end -->\nb\n", None),
        ("a\n<!-- peers:start -->\nnew figures\n<!-- peers:end -->\nB\n", "outside the section changed"),
    ],
)
def test_write_docs_touches_only_its_section(after: str, problem: str | None) -> None:
    start, end = peers.markers(peers.SECTION)
    assert (start, end) == ("<!-- peers:start -->", "<!-- peers:end -->")
    before = "a\n<!-- peers:start -->\nold\n<!-- peers:end -->\nb\n"
    found = peers.check_others(before, after)
    assert (found is None) if problem is None else (problem in (found or ""))

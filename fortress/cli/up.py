"""``fortress up``: start local replicas (the embedded model by default) and the gateway, in one
process, and stop both cleanly on Ctrl-C or SIGTERM.

Thin: it turns its flags into a ``FortressConfig`` (built as objects) and hands it to
``fortress.runtime``, which binds the port before any model loads (a busy port fails at once),
runs the replicas and the gateway on one event loop and owns the signals. What is this
command's own: the state-dir lock (taken before anything loads), the progress display while
models load, the first API key and the banner.

Stdout carries the JSON access-log lines only; the banner, the snippets and the progress go
to stderr. The first key (on the built-in ``operator`` plan, without limits) is created and
shown only where a person can read it: stderr on a terminal, or ``--show-key``. Otherwise no
key is made and the banner says how to create one (``fortress keys create``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fortress.cli.common import ExitCode, err_console, fail, find_cli_config
from fortress.cli.workers import WORKERS_OPTION, count_workers, parse_workers, run_workers, with_workers

# The snippets ask for a short answer: a first request should come back in seconds, not
# after the model has written its whole context.
SNIPPET_MAX_TOKENS = 64


class EngineChoice(StrEnum):
    llamacpp = "llamacpp"
    vllm = "vllm"


def up(
    replicas: int | None = typer.Option(
        None, "--replicas", "-n", min=1, help="How many replica processes to start (default: 1)."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="llamacpp: path of a .gguf file (default: the embedded SmolLM2-135M-Instruct); "
        "vllm: a Hugging Face model id or directory (required).",
    ),
    engine: EngineChoice = typer.Option(EngineChoice.llamacpp, "--engine", "-e", help="The model server."),
    port: int | None = typer.Option(
        None, "--port", "-p", help="Gateway port (default: 8080, or the config's server.port)."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="Start what this fortress.yaml describes, local engines included (default: "
        "$FORTRESS_CONFIG, else ./fortress.yaml if present, else the embedded model).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display while models load."),
    show_key: bool = typer.Option(
        False,
        "--show-key",
        help="Create and print the first API key even when stderr is not a terminal (a log file).",
    ),
    workers: str | None = WORKERS_OPTION,
) -> None:
    """Start a model and the OpenAI-compatible gateway in front of it, on this machine.

    With no options (and no ./fortress.yaml) it runs the embedded model (SmolLM2-135M-Instruct via llama.cpp) on 127.0.0.1 with API keys and the audit trail on; the first run in a terminal creates an API key on the unlimited `operator` plan and prints it once, with the URL and ready-to-paste curl and Python snippets (all on stderr: stdout carries the JSON access log). It restarts the model server if it crashes and stops everything on Ctrl-C. A second gateway on the same state dir exits 3 before loading anything.

    Examples:

    [bold]fortress up[/bold]  (the embedded model, gateway on http://127.0.0.1:8080/v1)

    [bold]fortress up --replicas 2 --model ./qwen2.5-0.5b-instruct-q4_k_m.gguf[/bold]

    [bold]fortress up --engine vllm --model Qwen/Qwen2.5-7B-Instruct[/bold]  (a GPU machine)

    [bold]fortress up -c fortress.yaml[/bold]  (pools with engine: llamacpp / vllm / external)

    [bold]fortress up -c remote.yaml --workers 4[/bold]  (only replicas by URL: four gateway processes)
    """  # noqa: E501
    n_workers = parse_workers(workers)
    cfg = with_workers(_config(config, replicas, model, engine, port), n_workers)
    found, _ = find_cli_config(config)
    with hold_state_dir(cfg):
        # A reload (SIGHUP) reads the file again and keeps the command line's --port and --workers.
        def keep(c: Any) -> Any:
            if port is not None:
                c = c.replace(server=c.server.replace(port=port))
            return with_workers(c, n_workers)

        code = _run(cfg, quiet, show_key or sys.stderr.isatty(), found, keep)
    raise typer.Exit(code)


@contextlib.contextmanager
def hold_state_dir(cfg: Any) -> Iterator[None]:
    """Hold ``cfg``'s state dir for this gateway (``up`` or ``serve``) while the block runs.

    Taken before the runtime is built: a second gateway on the same dir stops here, before a
    model loads or the store is migrated, with one line and exit 3.
    """
    from fortress.core.statedir import StateDirBusy, lock_state_dir

    try:
        lock = lock_state_dir(cfg.state_dir)
    except StateDirBusy as exc:
        fail(f"{exc}; stop it, or give this one another state_dir", ExitCode.STATE_DIR_IN_USE)
    except OSError as exc:
        fail(f"cannot use state dir {cfg.state_dir}: {exc.strerror or exc}", ExitCode.FAILED)
    with lock:
        yield


# -- configuration -------------------------------------------------------------------------


def _config(
    path: Path | None, replicas: int | None, model: str | None, engine: EngineChoice, port: int | None
) -> Any:
    from pydantic import ValidationError

    from fortress.config import (
        ConfigError,
        LlamaCppOptions,
        LlamaCppReplicaConfig,
        PoolConfig,
        VllmOptions,
        VllmReplicaConfig,
        build_config,
        load_config,
    )
    from fortress.engines import EngineError, engine_for

    found, how = find_cli_config(path)
    try:
        if found is not None:
            if replicas is not None or model is not None or engine is not EngineChoice.llamacpp:
                where = "--config" if how == "-c" else f"a config ({found}, from {how})"
                _fail(f"with {where} the file describes the replicas: drop --replicas/--model/--engine")
            cfg = load_config(found)
        else:
            count = replicas or 1
            rc: LlamaCppReplicaConfig | VllmReplicaConfig
            if engine is EngineChoice.vllm:
                if not model:
                    _fail("--engine vllm needs --model (a Hugging Face model id or a model directory)")
                rc = VllmReplicaConfig(count=count, options=VllmOptions(model=model))
            else:
                rc = LlamaCppReplicaConfig(count=count, options=LlamaCppOptions(model=model))
            served = engine_for(rc).model  # llama.cpp: resolves the binary and the GGUF now
            # A quick local start on loopback with the defaults: API keys (a first one is created
            # and printed), audit headers and the audit trail are on. Anything else is a config
            # file away; FORTRESS__* environment overrides still apply.
            cfg = build_config({}, "(fortress up)")
            cfg = cfg.replace(pools=[PoolConfig(model=served, replicas=[rc])])
        if port is not None:
            cfg = cfg.replace(server=cfg.server.replace(port=port))
    except (ConfigError, EngineError) as exc:
        _fail(str(exc))
    except ValidationError as exc:  # a value given on the command line
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()))
    if not any(p.replicas for p in cfg.pools):
        _fail("the config has no replicas to start or to route to")
    return cfg


def _fail(message: str, code: int = ExitCode.USAGE) -> Any:
    fail(message, code)


# -- running -------------------------------------------------------------------------------


def _run(
    cfg: Any,
    quiet: bool,
    show_key: bool = False,
    config_path: Path | None = None,
    overrides: Any = None,
) -> int:
    """Build the runtime (engine errors surface now), bind the port, then serve until stopped."""
    from fortress.engines import EngineError
    from fortress.fleet.supervisor import SupervisorError
    from fortress.routing.pool import NamingError
    from fortress.runtime import Runtime, StartError, bind, setup_logging

    setup_logging(cfg)
    count = count_workers(cfg, "up")
    if count > 1:  # replicas by URL only (local ones allow one worker): the banner is worker 0's

        def banner(index: int, sock: Any) -> dict[str, Any]:
            if index:
                return {}
            url = _display_url(cfg.server.host, sock.getsockname()[1])

            async def ready(runtime: Any, url: str) -> None:
                await _ready(runtime, url, show_key, config_path)

            return {"on_ready": ready, "url": url}

        return run_workers(cfg, count, config_path, overrides, banner)
    try:
        runtime = Runtime(cfg, config_path=config_path, overrides=overrides)
    except (EngineError, SupervisorError, NamingError) as exc:
        return _fail(str(exc))
    try:
        sock = bind(cfg.server.host, cfg.server.port)
    except StartError as exc:
        return _fail(str(exc), 1)
    url = _display_url(cfg.server.host, sock.getsockname()[1])
    if not cfg.auth.enabled and cfg.server.host not in _LOOPBACK:
        err_console.print(f"[yellow]warning:[/yellow] API keys are off and the gateway listens on {url}")

    async def ready(runtime: Any, url: str) -> None:
        await _ready(runtime, url, show_key, config_path)

    return int(runtime.run(sock, watch=None if quiet else _progress, on_ready=ready, url=url))


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _display_url(host: str, port: int) -> str:
    from fortress.engines.base import http_url

    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # what to paste on this machine
    return http_url(host, port)


async def _progress(supervisor: Any, started: Awaitable[list[Any]]) -> list[Any]:
    """A Rich progress line per local replica while the models load."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    done = asyncio.ensure_future(started)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        ids = {s: progress.add_task(s.name, total=1) for s in supervisor.slots if not s.asleep}
        while True:
            for s, tid in ids.items():
                what = f"[bold]{s.name}[/bold] {s.engine.kind} :{s.port or '?'} {escape(s.detail)}"
                finished = s.first_ready.is_set()
                progress.update(tid, description=what, completed=1 if finished else 0)
                if finished:
                    progress.stop_task(tid)
            if done.done():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 0.25)
    return await done


def _ensure_operator_key(
    store: Any, plans: list[str], create: bool
) -> tuple[str | None, list[dict[str, Any]]]:
    """(plaintext of a new first key or None, the active keys). The first key is created only
    when the store has no active key and ``create`` (it will be shown); it gets the built-in
    ``operator`` plan, so the operator's own traffic is never rate limited."""
    from fortress.access.keys import FIRST_KEY_NAME
    from fortress.config.access import OPERATOR_PLAN

    active = store.list(include_revoked=False)
    if active or not create:
        return None, active
    if not plans:
        raise ValueError("no usage plans are configured: add one under `plans:`")
    plan = (
        OPERATOR_PLAN if OPERATOR_PLAN in plans else ("default" if "default" in plans else sorted(plans)[0])
    )
    key, rec = store.create(FIRST_KEY_NAME, plan)
    return key, [rec]


async def _first_key(runtime: Any, create: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """Create the first API key when the store has none, and make the gateway know it now.

    Done once everything is up, right before the banner that shows it: a start that fails, or
    one whose banner goes where nobody reads it (``create=False``), never leaves behind a key
    nobody saw.
    """
    from fortress.access.layer import AccessControl

    access = runtime.access
    if not isinstance(access, AccessControl):
        return None, []
    try:
        keys = await asyncio.to_thread(_ensure_operator_key, access.store, list(runtime.config.plans), create)
        if keys[0] is not None:
            await access.cache.sync()  # usable at once, not after the next cache refresh
        return keys
    except Exception as exc:
        err_console.print(f"[red]error:[/red] cannot create the first API key: {escape(str(exc))}")
        return None, []


async def _ready(runtime: Any, url: str, show_key: bool = True, config_path: Path | None = None) -> None:
    """Print where to send requests (on stderr), with the first API key when this run made it."""
    router = runtime.router
    keys = await _first_key(runtime, create=show_key)
    models = router.configured_models() or sorted(router.index)
    banner = _banner(runtime.config, url, models, runtime.supervisor, keys, config_path)
    sys.stderr.write(banner + "\n")
    sys.stderr.flush()


# -- the banner ----------------------------------------------------------------------------


def _banner(
    cfg: Any,
    url: str,
    models: list[str],
    supervisor: Any,
    keys: tuple[str | None, list[Any]] = (None, []),
    config_path: Path | None = None,
) -> str:
    model = models[0] if models else "MODEL"
    api = url + "/v1"
    new_key, active = keys
    key = "unused"
    headers: dict[str, str] = {}
    if cfg.auth.enabled:
        key = new_key or "YOUR_KEY"
        headers["Authorization"] = f"Bearer {key}"
    if cfg.audit.enabled:
        values = {"x-llm-source": "quickstart", "x-llm-user": "me", "x-llm-request-type": "chat"}
        for h in cfg.audit.required_headers:
            headers[h] = values.get(h, "demo")
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": SNIPPET_MAX_TOKENS,
        }
    )
    curl = [f"curl {api}/chat/completions -H 'Content-Type: application/json'"]
    curl += [f"  -H '{k}: {v}'" for k, v in headers.items()]
    curl.append(f"  -d '{body}'")
    extra = {k: v for k, v in headers.items() if k != "Authorization"}
    py_headers = f", default_headers={extra!r}" if extra else ""
    config_hint = f" -c {config_path}" if config_path is not None else ""
    slots = supervisor.slots if supervisor is not None else []
    procs = ", ".join(f"{s.name} ({s.engine.kind}, {s.url or 'asleep'})" for s in slots) or "none"
    logs = f"{supervisor.log_dir}/" if supervisor is not None else "(no local replicas)"
    lines = [
        "",
        f"Fortress is ready: {api}",
        f"  model{'s' if len(models) > 1 else ''}: {', '.join(models) or '(discovered from replicas)'}",
        f"  local replicas: {procs}",
        f"  logs: {logs}   status: fortress status --url {url}   stop: Ctrl-C",
    ]
    if cfg.observe.enabled and cfg.observe.dashboard:
        lines.append(f"  dashboard: {url}/dashboard   metrics: {url}/metrics")
    if new_key:
        rec = active[0]
        lines += [
            "",
            f"  Your first API key ({rec['name']}, plan {rec['plan']}; stored only as a hash, "
            "shown this once):",
            f"    {new_key}",
        ]
    elif cfg.auth.enabled and not active:
        # stderr is not a terminal (a log file): no key was made, none is written anywhere.
        lines += [
            "",
            "  API keys are on and there is none yet. Create one (printed once, never logged):",
            f"    fortress keys create --name me --plan operator{config_hint}",
            "  or restart with --show-key to print the first key here.",
        ]
    elif cfg.auth.enabled:
        prefixes = ", ".join(f"{r['prefix']}… ({r['name']})" for r in active[:3])
        more = f" and {len(active) - 3} more" if len(active) > 3 else ""
        lines += [
            "",
            f"  API keys are on; active keys: {prefixes or 'none'}{more}.",
            f"  Use one as YOUR_KEY, or create another: fortress keys create --name me{config_hint}",
        ]
    if cfg.audit.enabled:
        lines.append(f"  Every request must send the audit headers: {', '.join(cfg.audit.required_headers)}")
    lines += [
        "",
        "curl:",
        " \\\n".join(curl),
        "",
        "Python (pip install openai):",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{api}", api_key="{key}"{py_headers})',
        f'reply = client.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "Say hello."}}], max_tokens={SNIPPET_MAX_TOKENS})',
        "print(reply.choices[0].message.content)",
        "",
    ]
    return "\n".join(lines)

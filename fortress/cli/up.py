"""``fortress up``: start local replicas (the embedded model by default) and the gateway, in one
process, and stop both cleanly on Ctrl-C or SIGTERM.

One event loop runs the supervisor and uvicorn. The gateway's port is bound before any model
loads, so a busy port fails at once rather than after minutes of loading. ``fortress up`` owns
SIGINT and SIGTERM in both phases: while replicas load, a signal cancels the start and stops
them; while serving, it stops uvicorn, whose shutdown drains and stops the replicas. A second
signal kills everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fortress.cli.common import err_console


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
        None, "--config", "-c", help="Start what this fortress.yaml describes, local engines included."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display while models load."),
) -> None:
    """Start a model and the OpenAI-compatible gateway in front of it, on this machine.

    With no options it runs the embedded model (SmolLM2-135M-Instruct via llama.cpp) on 127.0.0.1 with API keys and the audit trail on; the first run creates an API key and prints it once, with the URL and ready-to-paste curl and Python snippets. It restarts the model server if it crashes and stops everything on Ctrl-C.

    Examples:

    [bold]fortress up[/bold]  (the embedded model, gateway on http://127.0.0.1:8080/v1)

    [bold]fortress up --replicas 2 --model ./qwen2.5-0.5b-instruct-q4_k_m.gguf[/bold]

    [bold]fortress up --engine vllm --model Qwen/Qwen2.5-7B-Instruct[/bold]  (a GPU machine)

    [bold]fortress up -c fortress.yaml[/bold]  (pools with engine: llamacpp / vllm / external)
    """  # noqa: E501
    cfg = _config(config, replicas, model, engine, port)
    logging.basicConfig(
        level=cfg.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = _run(cfg, quiet)
    except KeyboardInterrupt:  # a signal before our handlers were installed
        code = 130
    raise typer.Exit(code)


# -- configuration -------------------------------------------------------------------------


def _config(
    path: Path | None, replicas: int | None, model: str | None, engine: EngineChoice, port: int | None
) -> Any:
    import yaml

    from fortress.config import ConfigError, Server, load_config, parse_config
    from fortress.replicas.engines import EngineError, LlamaCppEngine, VllmEngine

    try:
        if path is not None:
            if replicas is not None or model is not None or engine is not EngineChoice.llamacpp:
                _fail("with --config the file describes the replicas: drop --replicas/--model/--engine")
            cfg = load_config(path)
        else:
            options: dict[str, Any] = {"model": model} if model else {}
            if engine is EngineChoice.vllm:
                if not model:
                    _fail("--engine vllm needs --model (a Hugging Face model id or a model directory)")
                served = VllmEngine.from_options(options).model
            else:
                served = LlamaCppEngine.from_options(options).model  # resolves binary and GGUF now
            # A quick local start on loopback with the defaults: API keys (a first one is created
            # and printed), audit headers and the audit trail are on. Anything else is a config
            # file away; FORTRESS__* environment overrides still apply.
            doc = {
                "pools": [
                    {
                        "model": served,
                        "replicas": [{"engine": engine.value, "count": replicas or 1, "options": options}],
                    }
                ],
            }
            cfg = parse_config(yaml.safe_dump(doc), "(fortress up)")
    except (ConfigError, EngineError) as exc:
        _fail(str(exc))
    if port is not None:
        server = cfg.server.model_copy(update={"port": port})
        cfg = cfg.model_copy(update={"server": Server.model_validate(server.model_dump())})
    if not any(p.replicas for p in cfg.pools):
        _fail("the config has no replicas to start or to route to")
    return cfg


def _fail(message: str, code: int = 2) -> Any:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


# -- running -------------------------------------------------------------------------------


def _server(gateway: Any, cfg: Any) -> Any:
    """A uvicorn server without its own signal handlers: ``fortress up`` handles signals for both
    phases (uvicorn's would act only once startup completes, and re-raise the signal on exit)."""
    import uvicorn

    from fortress.gateway.server import build_server

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return Server(build_server(gateway, cfg).config)


def _run(cfg: Any, quiet: bool) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(cfg, quiet))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    return sock  # not inheritable: the replica processes must not hold the gateway's port


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _display_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # what to paste on this machine
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _main(cfg: Any, quiet: bool) -> int:
    from fortress.gateway.server import build_gateway
    from fortress.replicas.engines import EngineError
    from fortress.replicas.supervisor import Supervisor, SupervisorError, kill_all_now
    from fortress.routing.pool import Router

    router = Router(cfg)
    supervisor = Supervisor(router, state_dir=cfg.state_dir, quiet=quiet, console=err_console)
    try:
        supervisor.plan()
    except (EngineError, SupervisorError) as exc:
        _fail(str(exc))
    gateway = build_gateway(cfg, router)
    sock = _bind(cfg.server.host, cfg.server.port)
    store = await asyncio.to_thread(_key_store, cfg) if cfg.auth.enabled else None
    url = _display_url(cfg.server.host, sock.getsockname()[1])
    if not cfg.auth.enabled and cfg.server.host not in _LOOPBACK:
        err_console.print(f"[yellow]warning:[/yellow] API keys are off and the gateway listens on {url}")
    gateway.processes = lambda: [slot.snapshot() for slot in supervisor.slots]  # fortress status
    # Drain and stop the replicas first on shutdown, while the relay is still there.
    gateway.on_shutdown.insert(0, supervisor.stop)
    server = _server(gateway, cfg)

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    serving = False
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # asked twice: do not wait for drains or slow replicas
            err_console.print(f"{sig.name} again: killing the replicas now")
            kill_all_now()
            server.force_exit = True
            server.should_exit = True
            return
        err_console.print(f"{sig.name}: stopping (drain, then stop the replicas)")
        if serving:
            server.should_exit = True
        else:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    announce: asyncio.Task[None] | None = None
    try:
        if supervisor.slots:
            failed = await supervisor.start()
            if len(failed) == len(supervisor.slots):
                for slot in failed:
                    err_console.print(
                        f"[red]{slot.name} failed:[/red] {escape(slot.detail)}; log: {slot.log_path}"
                    )
                    print("\n".join(list(slot.tail)[-20:]), file=sys.stderr)
                return 1
        serving = True
        announce = asyncio.create_task(_announce(server, gateway, cfg, url, supervisor, store))
        await server.serve(sockets=[sock])
        return 0
    except asyncio.CancelledError:
        if not signals:
            raise
        main.uncancel()
        return 0
    finally:
        if announce is not None:
            announce.cancel()
        await supervisor.stop()
        sock.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _key_store(cfg: Any) -> Any:
    """The API key store, migrated: a database we cannot use fails now, before models load."""
    from fortress.access.keys import KeyStore
    from fortress.access.secret import load_secret
    from fortress.store.db import database_url, migrate

    url = database_url(cfg)
    try:
        return KeyStore(migrate(url), load_secret(cfg))
    except Exception as exc:
        return _fail(f"cannot prepare API keys in {url}: {exc}", 1)


async def _first_key(gateway: Any, cfg: Any, store: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """Create the first API key when the store has none, and make the gateway know it now.

    Done once everything is up, right before the banner that shows it: a start that fails
    never leaves behind a key nobody saw.
    """
    from fortress.access.keys import ensure_first_key

    try:
        keys = await asyncio.to_thread(ensure_first_key, store, list(cfg.plans))
        cache = getattr(gateway.access, "cache", None)
        if keys[0] is not None and cache is not None:
            await cache.sync()  # usable at once, not after the next cache refresh
        return keys
    except Exception as exc:
        err_console.print(f"[red]error:[/red] cannot create the first API key: {escape(str(exc))}")
        return None, []


# -- the banner ----------------------------------------------------------------------------


async def _announce(server: Any, gateway: Any, cfg: Any, url: str, supervisor: Any, store: Any) -> None:
    """Print where to send requests once the gateway listens and every model has a healthy
    replica (or after 60 s, with a warning), with the first API key when this run made it."""
    router = gateway.router
    for _ in range(1200):
        if server.started and router.ready()[0]:
            break
        await asyncio.sleep(0.05)
    else:
        err_console.print("[yellow]warning:[/yellow] not every model has a healthy replica yet")
    keys = await _first_key(gateway, cfg, store) if store is not None else (None, [])
    models = router.configured_models() or sorted(router.index)
    print(_banner(cfg, url, models, supervisor, keys), flush=True)


def _banner(
    cfg: Any, url: str, models: list[str], supervisor: Any, keys: tuple[str | None, list[Any]] = (None, [])
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
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}]})
    curl = [f"curl {api}/chat/completions -H 'Content-Type: application/json'"]
    curl += [f"  -H '{k}: {v}'" for k, v in headers.items()]
    curl.append(f"  -d '{body}'")
    extra = {k: v for k, v in headers.items() if k != "Authorization"}
    py_headers = f", default_headers={extra!r}" if extra else ""
    procs = ", ".join(f"{s.name} ({s.engine.kind}, {s.url})" for s in supervisor.slots) or "none"
    lines = [
        "",
        f"Fortress is ready: {api}",
        f"  model{'s' if len(models) > 1 else ''}: {', '.join(models) or '(discovered from replicas)'}",
        f"  local replicas: {procs}",
        f"  logs: {supervisor.log_dir}/   status: fortress status --url {url}   stop: Ctrl-C",
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
    elif cfg.auth.enabled:
        prefixes = ", ".join(f"{r['prefix']}… ({r['name']})" for r in active[:3])
        more = f" and {len(active) - 3} more" if len(active) > 3 else ""
        lines += [
            "",
            f"  API keys are on; active keys: {prefixes or 'none'}{more}.",
            "  Use one as YOUR_KEY, or create another: fortress keys create --name me",
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
        'messages=[{"role": "user", "content": "Say hello."}])',
        "print(reply.choices[0].message.content)",
        "",
    ]
    return "\n".join(lines)

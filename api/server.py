"""The FastAPI app (routes, auth, CORS, root path, middleware) and `run_server` (engine + uvicorn)."""

from __future__ import annotations

import asyncio
import hmac
import importlib
import inspect
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

import tessera
from tessera.api import event_loop
from tessera.api.chat_template import check_no_chat_template, resolve_chat_template
from tessera.api.errors import error_response, install_error_handlers
from tessera.api.metrics import CONTENT_TYPE, ServerMetrics, StatsLogger
from tessera.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from tessera.api.server_config import ServerConfig
from tessera.api.serving_chat import ChatSettings, ServingChat
from tessera.api.serving_common import ServingContext, messages_chars, prepare_off_loop_if_large
from tessera.api.serving_completions import ServingCompletions
from tessera.api.serving_models import ServingModels
from tessera.api.serving_tokenize import ServingTokenize
from tessera.core.engine.client import EngineClient
from tessera.core.engine.core_client import LOG_FORMAT, freeze_start_up_objects
from tessera.core.errors import ConfigError, EngineDeadError, ModelNotFoundError, TesseraError
from tessera.core.interfaces.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # the playground page holds no data; its API calls need the key


def route_path(scope: Scope) -> str:
    """The path without --root-path, whether or not the proxy already stripped it."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class APIKeyMiddleware:
    """Every route but /health (and the static playground page) needs `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        provided = headers.get(b"authorization", b"")
        if not hmac.compare_digest(provided, self.expected):  # constant time
            response = error_response(
                "Invalid or missing API key: send it as 'Authorization: Bearer <key>'.", status=401
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _import(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"--middleware {path!r}: expected an import path like 'package.module.name'",
                          param="middleware")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--middleware {path!r} cannot be imported: {exc}", param="middleware") from None


def add_user_middleware(app: FastAPI, paths: tuple[str, ...]) -> None:
    for path in paths:
        obj = _import(path)
        if inspect.isclass(obj):
            app.add_middleware(obj)
        elif inspect.iscoroutinefunction(obj):
            app.middleware("http")(obj)
        else:
            raise ConfigError(
                f"--middleware {path!r} is neither a class nor an async function", param="middleware"
            )


def _default_model_name(model_path: str) -> str:
    from tessera.core.model_source import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME

    name = Path(model_path).name
    if name == DEFAULT_MODEL_FILE:
        return DEFAULT_MODEL_NAME
    return name[: -len(".gguf")] if name.endswith(".gguf") else (model_path or "default")


def build_app(engine: EngineClient, server_config: ServerConfig) -> FastAPI:
    """The HTTP app over an engine; run_server serves it, tests may drive it directly."""
    cfg = server_config
    info = engine.model_info
    names = list(cfg.served_model_names) or [_default_model_name(info.model_path)]
    metrics = ServerMetrics(engine, names[0])
    ctx = ServingContext(
        engine=engine, served_model_names=names, max_logprobs=cfg.max_logprobs,
        return_tokens_as_token_ids=cfg.return_tokens_as_token_ids, metrics=metrics,
        log_requests=not cfg.disable_log_requests, max_log_len=cfg.max_log_len,
    )
    if isinstance(info.tokenizer, Tokenizer):  # --tokenizer-mode mistral: it encodes chat itself
        check_no_chat_template(cfg.chat_template)
        template = None
    else:
        template = resolve_chat_template(cfg.chat_template, info.chat_template, info.tokenizer)
        if template is None:
            logger.warning("the model has no chat template: chat requests will get 400 until --chat-template is set")
    chat = ServingChat(ctx, ChatSettings(
        chat_template=template, response_role=cfg.response_role,
        trust_request_chat_template=cfg.trust_request_chat_template,
        enable_auto_tool_choice=cfg.enable_auto_tool_choice, tool_call_parser=cfg.tool_call_parser,
    ))
    if cfg.enable_auto_tool_choice and not cfg.tool_call_parser:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser", param="tool_call_parser")
    completions = ServingCompletions(ctx)
    models = ServingModels(ctx)
    tokenize = ServingTokenize(ctx, chat)

    app = FastAPI(title="tessera", version=tessera.__version__)
    # As vLLM does: the app (not uvicorn) holds --root-path, so paths work with or without the prefix.
    app.root_path = cfg.root_path or ""
    app.state.ctx = ctx
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            await engine.check_health()
        except TesseraError as exc:
            return error_response(exc.message, status=503, error_type="ServiceUnavailableError")
        except Exception as exc:  # a dead engine may fail in any way: unhealthy, not a 500
            return error_response(f"engine unhealthy: {exc}", status=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": tessera.__version__})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(models.list_models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        for card in models.list_models().data:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise ModelNotFoundError(f"The model {model_id!r} does not exist", param="model")

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        _check_engine(engine)
        return await completions.create(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        _check_engine(engine)
        return await chat.create(request, raw_request)

    @app.post("/tokenize")
    async def tokenize_endpoint(body: dict[str, Any]) -> JSONResponse:
        request: TokenizeCompletionRequest | TokenizeChatRequest
        if "messages" in body:
            request = TokenizeChatRequest.model_validate(body)
        else:
            request = TokenizeCompletionRequest.model_validate(body)
        num_chars = (
            messages_chars([m.model_dump() for m in request.messages])
            if isinstance(request, TokenizeChatRequest) else len(request.prompt)
        )
        result = await prepare_off_loop_if_large(num_chars, lambda: tokenize.tokenize(request))
        return JSONResponse(result.model_dump(exclude_none=True))

    @app.post("/detokenize")
    async def detokenize_endpoint(request: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(tokenize.detokenize(request).model_dump())

    @app.get("/", response_class=HTMLResponse)
    async def playground(raw_request: Request) -> HTMLResponse:
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        root = raw_request.scope.get("root_path", "") or ""
        return HTMLResponse(page.replace("__ROOT_PATH__", root.rstrip("/")))

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    # Starlette runs the middleware added last first: CORS (answers preflights) -> auth -> user's.
    add_user_middleware(app, cfg.middleware)
    if cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cfg.allowed_origins), allow_credentials=cfg.allow_credentials,
        allow_methods=list(cfg.allowed_methods), allow_headers=list(cfg.allowed_headers),
    )
    return app


def _check_engine(engine: EngineClient) -> None:
    if not engine.is_running:
        raise EngineDeadError("The engine has stopped; this server cannot serve requests. Restart it.")


# ---------------------------------------------------------------- running


async def build_engine(ns: Any) -> EngineClient:
    """The engine the CLI asked for: in its own process (ZMQ) unless --disable-frontend-multiprocessing."""
    from tessera.api.args import engine_config_from_args
    from tessera.core.engine.async_engine import AsyncEngine

    config = engine_config_from_args(ns)
    in_process = bool(getattr(ns, "disable_frontend_multiprocessing", False))
    return AsyncEngine(config, use_process=not in_process)


STATS_LOG_INTERVAL_S = 10.0


async def _log_stats(stats_logger: StatsLogger) -> None:
    """Every STATS_LOG_INTERVAL_S seconds, log throughput and cache use (vLLM's stats line)."""
    loop = asyncio.get_running_loop()
    while True:
        line = stats_logger.line(loop.time())
        if line is not None:
            logger.info("%s", line)
        await asyncio.sleep(STATS_LOG_INTERVAL_S)


async def _watch_engine(engine: EngineClient, server: Any, state: dict[str, int]) -> None:
    """If the engine dies, stop serving and exit non-zero instead of hanging."""
    while not server.should_exit:
        if not engine.is_running:
            logger.error("the engine stopped; shutting the server down")
            state["exit_code"] = 1
            server.should_exit = True
            return
        await asyncio.sleep(0.5)


def _uvicorn_server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would kill the process
        before the engine is shut down; here a signal only asks the server to exit."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


async def serve(ns: Any) -> int:
    import uvicorn

    _Server = _uvicorn_server_class()

    host, port = getattr(ns, "host", None) or "0.0.0.0", int(getattr(ns, "port", 8000))
    # The port first, as vLLM does: a port in use is then an error in a second, not after the
    # model has loaded, and nothing can take it while the engine starts.
    listener = listening_socket(host, port)
    try:
        engine = await build_engine(ns)
    except BaseException:
        listener.close()
        raise
    state = {"exit_code": 0}
    watchdog: asyncio.Task[None] | None = None
    stats_task: asyncio.Task[None] | None = None
    try:
        app = build_app(engine, ServerConfig.from_args(ns))
        freeze_start_up_objects()
        config = uvicorn.Config(
            app,
            host=host,
            port=listener.getsockname()[1],
            log_level=getattr(ns, "uvicorn_log_level", None) or "info",
            ssl_keyfile=getattr(ns, "ssl_keyfile", None),
            ssl_certfile=getattr(ns, "ssl_certfile", None),
            ssl_ca_certs=getattr(ns, "ssl_ca_certs", None),
            ssl_cert_reqs=int(getattr(ns, "ssl_cert_reqs", 0) or 0),
            timeout_keep_alive=5,
        )
        server = _Server(config)
        watchdog = asyncio.create_task(_watch_engine(engine, server, state))
        if not getattr(ns, "disable_log_stats", False):
            stats_task = asyncio.create_task(_log_stats(StatsLogger(engine, app.state.ctx.metrics)))
        await server.serve(sockets=[listener])
        if not server.started and state["exit_code"] == 0:
            state["exit_code"] = 1
    finally:
        for task in (watchdog, stats_task):
            if task is not None:
                task.cancel()
        listener.close()
        await engine.shutdown()
    return state["exit_code"]


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening; uvicorn listens on it once the app is
    built). A ConfigError says why it cannot be had: the port in use, a host not on this machine."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_server(ns: Any) -> int:
    """`tessera serve`: build the engine from the parsed flags and serve until stopped."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # while the engine loads: unwind, shutting it down
    try:
        return event_loop.run(serve(ns))
    except TesseraError as exc:
        logger.error("%s", exc.message)
        return 1
    except KeyboardInterrupt:
        return 0

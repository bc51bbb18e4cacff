"""``kre-handler-host``: load the user's code, serve it over gRPC, stop cleanly.

Start: settings (the host's and the data services', every problem reported at once)
-> import the handler module -> build the data-service clients -> gRPC server up,
health NOT_SERVING -> ``init(ctx)`` -> SERVING.
Stop (SIGTERM/SIGINT): NOT_SERVING -> in-flight calls finish within
KRT_SHUTDOWN_GRACE -> server stopped -> services closed -> exit 0.

Exit codes: 0 after a signal-driven stop; 1 when the host cannot start (handler file
not found, module raised on import, no handler, init raised, address not bindable);
2 when the environment is missing or has invalid variables.

With arguments it is a command line instead (``handler_host.cli``): ``kre-handler-host
call ...`` sends one message to a running host; ``kre-handler-host serve`` is the same
as no arguments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn

from handler_host import logs, metrics
from handler_host.context import Context, ContextServices
from handler_host.errors import RunnerError, SettingsError
from handler_host.loader import UserCode, load_user_code
from handler_host.server import HostServer, start_server
from handler_host.services import Services, ServiceSettings
from handler_host.settings import HostSettings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_BAD_SETTINGS = 2
LOG_FORMAT = logs.TEXT_FORMAT


async def start_host(
    settings: HostSettings,
    services: ContextServices | None = None,
    *,
    user_code: UserCode | None = None,
) -> HostServer:
    """Load the user code (unless given), start the server, run ``init(ctx)``, SERVING.

    The whole start sequence, shared by ``main`` and by tests that run a host
    in-process. On failure everything started is stopped again (the services closed
    too) and the error raised.
    """
    if user_code is None:
        user_code = load_user_code(settings.base_path, settings.handler_path)
    context = Context.from_settings(settings, services)
    try:
        server = await start_server(settings, user_code, context)
    except BaseException:
        await context.aclose()
        raise
    try:
        await server.run_init()
    except BaseException:
        await server.stop(0)
        raise
    await server.set_serving()
    return server


def read_settings(env: Mapping[str, str] = os.environ) -> tuple[HostSettings, ServiceSettings]:
    """The host's settings and its data services', read together before any user code.

    Raises one SettingsError listing the problems of both.
    """
    errors: list[SettingsError] = []
    try:
        settings = HostSettings.from_env(env)
    except SettingsError as exc:
        errors.append(exc)
    try:
        service_settings = ServiceSettings.from_env(env)
    except SettingsError as exc:
        errors.append(exc)
    if errors:
        raise SettingsError(
            [name for error in errors for name in error.missing],
            [problem for error in errors for problem in error.invalid],
        )
    return settings, service_settings


def open_services(settings: HostSettings, service_settings: ServiceSettings) -> ContextServices:
    """The data services behind ``ctx.db``, ``ctx.prediction`` and ``ctx.measurement``.

    Built once, connecting nothing yet (a driver is imported only for a service whose
    URI is set); a service whose URI is unset stays None and ``ctx.<name>`` then says
    which variable to set.
    """
    return Services.from_settings(
        service_settings,
        version_id=settings.version_id,
        version_name=settings.version,
        workflow=settings.workflow_name,
        node=settings.node_name,
    )


async def serve(settings: HostSettings, service_settings: ServiceSettings) -> None:
    """Run the handler host until SIGTERM or SIGINT, then stop it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_stop, sig, stop)
    # Up before init(ctx): a long model load can be watched (process memory, init time).
    metrics_server = _start_metrics(settings)
    try:
        await _serve_until(stop, settings, service_settings)
    finally:
        if metrics_server is not None:
            await metrics_server.close()


async def _serve_until(
    stop: asyncio.Event, settings: HostSettings, service_settings: ServiceSettings
) -> None:
    starting = asyncio.create_task(_start(settings, service_settings))
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        logger.info("stop requested while starting: start abandoned")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    waiting.cancel()
    host = starting.result()
    logger.info("handler host ready on %s", host.address)
    await stop.wait()
    await host.stop(settings.shutdown_grace)


def _start_metrics(settings: HostSettings) -> metrics.MetricsServer | None:
    metrics.set_info(
        settings.node_name, settings.workflow_name, settings.version, settings.version_id
    )
    if not settings.metrics_port:
        logger.info("metrics are off (KRT_METRICS_PORT=0)")
        return None
    return metrics.MetricsServer.start(settings.metrics_host, settings.metrics_port)


async def _start(settings: HostSettings, service_settings: ServiceSettings) -> HostServer:
    # The user code first: a wrong handler path fails fast, before any connection.
    user_code = load_user_code(settings.base_path, settings.handler_path)
    services = open_services(settings, service_settings)
    return await start_host(settings, services, user_code=user_code)


def _request_stop(sig: signal.Signals, stop: asyncio.Event) -> None:
    logger.info("received %s: shutting down", sig.name)
    stop.set()


def main(argv: list[str] | None = None) -> None:
    """The ``kre-handler-host`` console script: serve, or run a subcommand."""
    args = sys.argv[1:] if argv is None else argv
    if args and args != ["serve"]:
        from handler_host.cli import main as cli_main

        sys.exit(cli_main(args))
    log_format, level = logs.format_from_env(os.environ)
    logs.configure(log_format, level)
    try:
        settings, service_settings = read_settings()
    except SettingsError as exc:
        logger.error("%s", exc)
        _exit(EXIT_BAD_SETTINGS)
    logs.configure(settings.log_format, settings.log_level, node=settings.node_name)
    logger.info("settings: %s", settings.summary())
    try:
        _run(serve(settings, service_settings))
    except SettingsError as exc:  # a KRT_MONGO_URI that PyMongo refuses, found building its client
        logger.error("%s", exc)
        _exit(EXIT_BAD_SETTINGS)
    except RunnerError as exc:
        # Import and init errors carry the user's traceback in their message.
        logger.error("the handler host cannot start: %s", exc)
        _exit(EXIT_START_FAILED)
    except Exception:
        logger.exception("the handler host failed")
        _exit(EXIT_START_FAILED)
    logger.info("handler host stopped")
    _exit(EXIT_OK)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def _exit(code: int) -> NoReturn:
    _exit_on_another_signal(code)
    # The handler pool's workers, and any thread user code started and left running (a
    # daemon thread does not count): Python would wait for them at exit, forever perhaps.
    threads = [
        t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()
    ]
    deadline = time.monotonic() + 1.0
    for thread in threads:  # idle workers end on their own, at once
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        # A sync handler or init still runs past the grace period. Leave without waiting.
        names = ", ".join(sorted(t.name for t in stuck))
        logger.warning("exiting with %d user-code thread(s) still running: %s", len(stuck), names)
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _exit_on_another_signal(code: int) -> None:
    """From here on, SIGTERM or SIGINT ends the process at once, with `code`.

    The event loop that handled them is closed: on plain asyncio a second SIGTERM would
    otherwise kill the process (-15) while it waits for user threads, and under uvloop
    the closed loop's handler would swallow it.
    """

    def leave(signum: int, frame: object) -> None:
        os._exit(code)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)


if __name__ == "__main__":
    main()

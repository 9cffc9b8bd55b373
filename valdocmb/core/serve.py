"""Grand-challenge's invoke API: an HTTP server that loads the model once and segments the case under the input
folder each time it is invoked.

    python process.py --serve [--port 4743] [--input DIR --output DIR --method ... --device ...]

- `GET /health` answers 200 once the weights are loaded and the networks have run once (the server only starts
  listening then, so the platform's health polls are refused until it is ready);
- `POST /invoke` runs the same runner as exec mode on the input folder (any layout) and answers 201 when every
  case's outputs are written, 500 with the errors when some case failed or the run could not start. Invocations run
  one at a time. SIGTERM is uvicorn's to handle (graceful shutdown); the runner, in a worker thread, installs no
  handler.

Before each invocation the files the previous one wrote are removed, so an output folder the platform did not clear
never holds one case's mask beside another's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .stopping import Terminated, interrupt_thread, stop_on_sigterm

log = logging.getLogger("valdocmb")

MAX_BODY_BYTES = 1 << 20   # an /invoke body (the inputs come from the input folder)


class ErrorCollector(logging.Handler):
    """The error lines the runner logs during one invocation, for the response."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "summary", False):  # the run's closing summary repeats a case's error
            self.messages.append(record.getMessage())


def files_under(folder: Path) -> dict[Path, int]:
    """Every file under `folder` with its modification time (ns)."""
    if not folder.is_dir():
        return {}
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def warm_up(method) -> float:
    """Segment a small synthetic scan once, so that the first real case pays no first-call costs (memory pools,
    cuDNN's algorithm search); returns the seconds it took. A failure is logged, not fatal: the real cases report
    their own errors."""
    log.info("warm-up: one synthetic 64x64x24 scan")
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    volume = (rng.normal(100.0, 5.0, size=(24, 64, 64))).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 1.5))
    try:
        method.segment(image, {})
    except Exception as exc:  # noqa: BLE001 - a warm-up must never keep the server from starting
        log.warning("warm-up on a synthetic scan failed (%s: %s); serving anyway", type(exc).__name__, exc)
    return time.perf_counter() - start


class Invoker:
    """Runs invocations one at a time with the loaded method, cleaning up after the previous one.
    `runner(args, method) -> exit code` is the exec mode's runner (run.run), passed in so this module needs no
    import of it."""

    def __init__(self, args, method, runner):
        self.args, self.method, self.runner = args, method, runner
        self.lock = threading.Lock()
        self.count = 0
        self.written: dict[Path, int] = {}  # files the previous invocation left, with their modification times
        self.thread: int | None = None      # the thread running an invocation, while one runs

    def interrupt(self) -> None:
        """SIGTERM: stop the invocation in progress now (its case is recorded as interrupted and its partial
        outputs removed, as in exec mode), so the server can end before the platform's SIGKILL 5 s later."""
        thread = self.thread
        if thread is not None:
            log.warning("SIGTERM during invocation %d: stopping it", self.count)
            interrupt_thread(thread)

    def remove_previous_outputs(self) -> None:
        for path, mtime in self.written.items():
            try:
                if path.is_file() and path.stat().st_mtime_ns == mtime:
                    path.unlink()
            except OSError as exc:
                log.warning("could not remove %s from the previous invocation: %s", path, exc.strerror or exc)
        self.written = {}

    def invoke(self) -> tuple[int, dict]:
        """(HTTP status, JSON body) of one invocation; 409 while another one runs (its outputs stay its own)."""
        if not self.lock.acquire(blocking=False):
            log.warning("an /invoke arrived while invocation %d runs: refused (409)", self.count)
            return 409, {"status": "busy", "invocation": self.count,
                         "errors": [f"invocation {self.count} is running; invoke again when it has answered"]}
        try:
            self.count += 1
            number, start = self.count, time.perf_counter()
            log.info("invocation %d: %s -> %s", number, self.args.input, self.args.output)
            self.remove_previous_outputs()
            before = files_under(self.args.output)
            collector = ErrorCollector()
            log.addHandler(collector)
            self.thread = threading.get_ident()
            try:
                code = self.runner(self.args, self.method)
            except Terminated as exc:  # SIGTERM outside the runner's own handling (between its cases' records)
                code, collector.messages = 143, [*collector.messages, f"stopped by {exc}"]
                log.error("invocation %d: stopped by %s", number, exc)
            except Exception as exc:  # noqa: BLE001 - a bug must answer 500, not drop the connection
                log.exception("invocation %d failed", number)
                code, collector.messages = 1, [*collector.messages, f"unexpected {type(exc).__name__}: {exc}"]
            finally:
                self.thread = None
                log.removeHandler(collector)
            after = files_under(self.args.output)
            self.written = {path: mtime for path, mtime in after.items() if before.get(path) != mtime}
            seconds = time.perf_counter() - start
            log.info("invocation %d: exit code %d in %.1f s", number, code, seconds)
        finally:
            self.lock.release()
        body = {"invocation": number, "exit_code": code, "seconds": round(seconds, 2), "errors": collector.messages,
                "outputs": sorted(str(path.relative_to(self.args.output)) for path in self.written)}
        if code == 0:
            return 201, {"status": "done", **body}
        return 500, {"status": "failed", **body}


def create_app(args, method, runner, ready_info: dict | None = None):
    """The FastAPI application around a loaded method and the runner that processes the input folder."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    invoker = Invoker(args, method, runner)
    app = FastAPI(title="valdocmb", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.invoker = invoker

    @app.get("/health")
    def health():
        return {"status": "ready", **(ready_info or {})}

    @app.middleware("http")
    async def bounded_body(request, call_next):
        # /invoke reads its inputs from the input folder: a body has nothing to carry beyond a small JSON
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"status": "refused", "errors": [f"request body over {MAX_BODY_BYTES} bytes"]},
                                status_code=413)
        return await call_next(request)

    @app.post("/invoke")
    def invoke():  # a plain def: FastAPI runs it in a worker thread, so /health keeps answering meanwhile
        status, body = invoker.invoke()
        return JSONResponse(body, status_code=status)

    return app


def serve(args, runner, method_from) -> int:
    """Load the method with `method_from(args)` (run.method_from), warm it up, then serve until SIGTERM/SIGINT,
    running `runner` (run.run) on each invocation. Exit code 2 when it cannot start."""
    import uvicorn

    from .errors import CaseError

    start = time.perf_counter()
    try:
        with stop_on_sigterm():  # SIGTERM while loading: stop at once, and say so
            log.info("invoke mode")  # said once the handler is in place: a SIGTERM from here on is caught
            method = method_from(args)
            warm = warm_up(method)
    except CaseError as exc:
        log.error("cannot start method %s: %s", args.method, exc)
        return 2
    except Terminated as exc:
        log.error("stopped by %s while loading the method, before serving", exc)
        return 143
    log.info("ready in %.1f s (warm-up %.1f s); listening on %s:%d", time.perf_counter() - start, warm, args.host,
             args.port)
    info = {"method": args.method, "device": args.device, "weights": str(args.weights)}
    app = create_app(args, method, runner, info)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's signal handler: also stop the invocation in progress
            if sig == signal.SIGTERM:
                app.state.invoker.interrupt()
            super().handle_exit(sig, frame)

    server = Server(config)
    server.run()
    return 0 if server.started else 2

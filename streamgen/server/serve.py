"""`streamgen serve`: the streaming server (streamgen.server.app) over the pipeline of `--model`.

    streamgen serve                                   # built-in default model, http://127.0.0.1:8765/
    streamgen serve --model testpattern               # no model: a moving test pattern
    streamgen serve --model self-forcing-1.3b --checkpoint self_forcing_dmd.pt --vae Wan2.1_VAE.pth \\
        --text-encoder umt5-xxl/

Every setting is checked before the server listens, with the message a client would get for the
same value: a server that starts can serve its own defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys

from streamgen.pipeline import STREAM_MODELS, UsageError, add_model_arguments, positive

log = logging.getLogger(__name__)

TESTPATTERN = "testpattern"


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)")
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{v} is not a port number (1..65535)")
    return v


def _gib(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB (> 0)")
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of GiB (> 0)")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, models=STREAM_MODELS + (TESTPATTERN,))
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=_port, default=8765)
    g.add_argument("--token", default=os.environ.get("STREAMGEN_TOKEN") or None,
                   help="require this token (?token= or Authorization: Bearer); default $STREAMGEN_TOKEN")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed to open the WebSocket (repeatable; '*' = any). "
                        "Default: only this server's own origin")
    g.add_argument("--max-sessions", type=positive, default=4,
                   help="sessions on this server at once (each holds a KV cache on the engine)")
    g.add_argument("--max-sessions-per-client", type=positive, default=2, help="sessions per client address")
    g.add_argument("--queue-fragments", type=positive, default=8,
                   help="per-client send window; a slower client drops whole fragments beyond it")
    g.add_argument("--max-lead", type=float, default=0.75,
                   help="seconds of video generated ahead of the viewer's playhead when a start gives no `lead` "
                        "(default 0.75: about one chunk, so a prompt change shows at the next chunk; more rides "
                        "out network jitter, at the cost of reaction time; <= 0: unpaced)")
    g.add_argument("--public-host", action="append", default=[], metavar="NAME",
                   help="a Host name this server answers to besides loopback when it runs without --token "
                        "(repeatable; guards against DNS rebinding)")
    g.add_argument("--grace", type=float, default=10.0, help="seconds a session waits for `attach` after a disconnect")
    g.add_argument("--encode-threads", type=positive, default=4, help="H.264 encoder worker threads (shared)")
    g.add_argument("--preset", default="veryfast", help="libx264 preset (ultrafast..veryslow; default veryfast)")
    g.add_argument("--width", type=int, default=None, help="width of a start that gives none (default: the model's)")
    g.add_argument("--height", type=int, default=None, help="height of a start that gives none (default: the model's)")
    g.add_argument("--fps", type=int, default=None, help="test pattern frame rate (default 16)")
    g.add_argument("--warmup-sizes", default=None, metavar="WxH,...",
                   help="more frame sizes the engine warms up at start, besides the default size (each size's "
                        "first chunk pays kernel selection and autotuning: seconds on a GPU), e.g. 480x832,640x640")
    g.add_argument("--cache-memory", type=_gib, default=None, metavar="GIB",
                   help="GiB of KV cache the engine admits sessions into (a start that does not fit waits in a "
                        "queue, then gets 'overloaded'); default: 0.6 of the GPU memory free at start, "
                        "unbounded on the CPU")
    r = p.add_argument_group("ray (pip install 'streamgen[ray]')")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the engines as Ray actors, one per GPU, behind this one front: no ADDRESS starts a "
                        "local Ray; 'auto' or HOST:PORT joins a running cluster (each node needs streamgen and the "
                        "model files at the same paths)")
    r.add_argument("--ray-workers", type=positive, default=None, metavar="N",
                   help="engine workers under --ray (default: the cluster's GPUs, 1 without any)")


def run(args: argparse.Namespace, pipeline=None) -> int:
    """Serve until interrupted. ``pipeline``: a prebuilt engine Pipeline to serve instead of the one the
    model options name (bench/client_latency.py: random weights), every other setting from ``args``.
    On the CPU the engine's busy thread gets the intra-op threads (engine.core.engine_threads)."""
    from streamgen.engine.core import engine_threads
    from streamgen.pipeline import pick_device

    try:
        device = pipeline.device if pipeline is not None else pick_device(args.device)
    except UsageError as e:
        print(f"streamgen serve: error: {e}", file=sys.stderr)
        return 2
    # the Ray workers are other processes: their engines keep torch's setting
    with engine_threads(device) if args.ray is None else contextlib.nullcontext() as threads:
        return _serve(args, pipeline, threads)


def _serve(args: argparse.Namespace, pipeline, threads: int | None) -> int:
    try:
        cfg, factory, executor = _build(args, pipeline, threads)
    except UsageError as e:
        print(f"streamgen serve: error: {e}", file=sys.stderr)
        return 2
    from aiohttp import web

    from streamgen.server.app import build_app

    app = build_app(cfg, factory, executor=executor)
    if args.ray is not None:
        app.on_startup.append(factory.on_startup)  # the workers' health check, on the server's loop
    url = f"http://{args.host}:{args.port}/"
    log.info("serving model %r at %s%s", cfg.model, url, " (token required: ?token=...)" if cfg.token else "")
    logging.getLogger("aiohttp.server").addFilter(_one_line_bad_requests)
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    except OSError as e:  # e.g. the port is in use
        print(f"streamgen serve: error: --host {args.host} --port {args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def _build(args: argparse.Namespace, pipeline=None, threads: int | None = None):
    """Check every setting, then build the frame-source factory (and the engine behind it); ``pipeline``:
    see ``run`` (then ``--model`` names only the preset whose settings apply, and no weights are read)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from streamgen.media.encode import X264_PRESETS
    from streamgen.protocol import DEFAULT_LIMITS
    from streamgen.server.state import ServerConfig

    _check_port(args.host, args.port)
    if args.preset not in X264_PRESETS:
        raise UsageError(f"--preset {args.preset}: allowed: {', '.join(X264_PRESETS)}")
    if args.token is not None and not args.token.strip():  # e.g. --token "$UNSET": never silently open
        raise UsageError("--token: empty; give the token clients must send, or leave --token out to serve "
                         "without one (loopback only)")
    if args.max_sessions_per_client > args.max_sessions:
        raise UsageError(f"--max-sessions-per-client {args.max_sessions_per_client} exceeds --max-sessions "
                         f"{args.max_sessions}")
    cfg = ServerConfig(
        model=args.model, token=args.token or None, allowed_origins=list(args.allowed_origin),
        max_sessions=args.max_sessions, max_sessions_per_client=args.max_sessions_per_client,
        queue_fragments=args.queue_fragments, max_lead_s=args.max_lead if args.max_lead > 0 else None,
        grace_s=args.grace, encode_threads=args.encode_threads, preset=args.preset,
        public_hosts=list(args.public_host),
    )
    if args.ray is None and args.ray_workers is not None:
        raise UsageError("--ray-workers applies to --ray (engine workers as Ray actors)")
    if args.ray is not None:
        if args.model == TESTPATTERN:
            raise UsageError(f"--ray: --model {TESTPATTERN} draws its frames on the front; there is no engine "
                             "to run on Ray workers")
        if pipeline is not None:
            raise UsageError("--ray: the workers build their own pipelines from the model options")
        try:
            import ray  # noqa: F401 - only under --ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'streamgen[ray]'") from None
    executor = ThreadPoolExecutor(max_workers=cfg.encode_threads, thread_name_prefix="encode")
    if args.model == TESTPATTERN:
        from streamgen.server.sources import TestPatternFactory

        given = [f for f, v in (("--checkpoint", args.checkpoint), ("--vae", args.vae),
                                ("--text-encoder", args.text_encoder)) if v is not None]
        given += ["--rife"] if args.rife not in (None, "auto", "none") else []
        if given:
            raise UsageError(f"{given[0]}: --model {TESTPATTERN} draws its frames and loads no weight files")
        if args.cache_memory is not None:
            raise UsageError(f"--cache-memory: --model {TESTPATTERN} draws its frames and has no engine to hold caches")

        w, h = args.width or 320, args.height or 192
        _check_size(w, h, DEFAULT_LIMITS)
        fps = args.fps or 16
        if not DEFAULT_LIMITS.min_fps <= fps <= DEFAULT_LIMITS.max_fps:
            raise UsageError(f"--fps {fps}: allowed {DEFAULT_LIMITS.min_fps}..{DEFAULT_LIMITS.max_fps}")
        return cfg, TestPatternFactory(args.model, width=w, height=h, fps=fps, executor=executor), executor
    if args.fps is not None:
        raise UsageError(f"--fps applies to --model {TESTPATTERN}; a model generates at its own rate "
                         "(ask for more with interpolate 2 or 4)")

    from streamgen.pipeline import MODELS, check_options

    folder = args.model
    preset = check_options(args) if pipeline is None else MODELS[args.model]
    if preset.mode != "stream":  # a --model folder that holds a whole-clip model
        raise UsageError(f"--model {folder}: holds {args.model}, a whole-clip model (`streamgen generate` runs it); "
                         f"serve streams {', '.join(n for n in STREAM_MODELS if not MODELS[n].builtin or n == 'toy')}")
    limits = replace(DEFAULT_LIMITS, max_pixels=preset.max_pixels)
    w, h = args.width or preset.width, args.height or preset.height
    _check_size(w, h, limits)
    sizes = [(w, h)]
    for item in (args.warmup_sizes or "").split(","):
        if not item.strip():
            continue
        ww, _, hh = item.strip().lower().partition("x")
        try:
            size = (int(ww), int(hh))
        except ValueError:
            raise UsageError(f"--warmup-sizes: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 480x832)") from None
        try:
            _check_size(*size, limits)
        except UsageError as e:
            raise UsageError(f"--warmup-sizes {item.strip()}: {e}") from None
        if size not in sizes:
            sizes.append(size)
    if args.ray is not None:
        return cfg, _ray_factory(args, limits, sizes, w, h, executor), executor
    engine = build_engine(args, limits, sizes, w, h, pipeline, threads=threads)
    from streamgen.server.sources import EngineFactory

    return cfg, EngineFactory(args.model, engine, width=w, height=h, executor=executor), executor


def build_engine(args: argparse.Namespace, limits, sizes: list[tuple[int, int]], w: int, h: int, pipeline=None,
                 threads: int | None = None):
    """The (not started) engine of the checked model options in ``args`` (or of ``pipeline``), warmed up
    at ``sizes``; the default ``w`` x ``h`` must be servable (the check a client's start gets), else
    UsageError. ``threads``: the busy thread's intra-op threads (EngineSettings.threads). Each
    `serve --ray` worker runs this too."""
    from streamgen.engine.core import Engine, EngineError, GenRequest
    from streamgen.pipeline import MODELS, build_pipeline, engine_settings

    pipe = build_pipeline(args) if pipeline is None else pipeline
    warmup = tuple(GenRequest("warm-up", ww, hh, interpolate=2 if pipe.rife is not None else 1, chunks=2,
                              name="warm-up") for ww, hh in sizes)
    try:
        memory = None if args.cache_memory is None else int(args.cache_memory * 2**30)
        engine = Engine(pipe, engine_settings(args, MODELS[args.model], limits=limits, warmup=warmup,
                                              cache_memory=memory, threads=threads,
                                              warmup_batch=getattr(args, "max_sessions", None)))  # batches it can hold
        # the defaults must be servable: the same check a client's start gets
        check = GenRequest("check", w, h, chunks=None if engine.settings.local_frames else 1)
        engine.validate(check)
        if not engine.pool.fits_ever(need := engine.cache_bytes(check)):
            given = f" {args.cache_memory:g}" if args.cache_memory is not None else ""
            raise UsageError(f"--cache-memory{given}: a {w}x{h} session needs {need / 2**30:.3g} GiB of KV cache; "
                             f"the engine's pool holds {engine.pool.capacity_bytes / 2**30:.3g} GiB")
    except EngineError as e:
        raise UsageError(f"--{(e.field or 'model').replace('_', '-')}: {e}") from None
    return engine


def _ray_factory(args: argparse.Namespace, limits, sizes, w: int, h: int, executor):
    """`serve --ray`: join (or start) Ray, start the engine workers (each runs ``build_engine`` on its
    own GPU) and wait until every one is built; a worker's build error is this command's one line."""
    import asyncio
    import functools

    import ray

    from streamgen.parallel.ray_pool import RayEnginePool
    from streamgen.parallel.ray_sources import RaySourceFactory

    address = None if args.ray == "local" else args.ray
    owns = not ray.is_initialized()
    if owns:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: one line
            where = "start a local Ray" if address is None else f"connect to the Ray cluster at {address}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--ray{'' if address is None else ' ' + address}: cannot {where}: {first}") from None
    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    workers = args.ray_workers or max(1, gpus)
    if gpus and workers > gpus:
        raise UsageError(f"--ray-workers {workers}: the Ray cluster has {gpus} GPU(s), one worker each")
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    pool = RayEnginePool(workers, num_gpus=1 if gpus else 0,
                         make_engine=functools.partial(build_engine, plain, limits, sizes, w, h))
    log.info("starting %d engine worker(s) on Ray (%d GPU each)", workers, 1 if gpus else 0)
    states = asyncio.run(pool.ready())
    for i, st in enumerate(states):
        if st.get("error"):
            pool.shutdown()
            if owns:
                ray.shutdown()
            raise UsageError(st["error"] if st["error"].startswith("--") else
                             f"--ray: engine worker {i} failed to start: {st['error']}")
    for i, st in enumerate(states):
        log.info("engine worker %d: pid %s on %s", i, st.get("pid"), st.get("node"))
    return RaySourceFactory(args.model, pool, width=w, height=h, fps=states[0]["fps"], executor=executor,
                            owns_ray=owns)


def _check_port(host: str, port: int) -> None:
    """Fail before the model is built when the address cannot be bound (port taken, unknown host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror or e})") from None
    for family, kind, proto, _, addr in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: TIME_WAIT is no conflict
            try:
                s.bind(addr)
            except OSError as e:
                why = "already in use by another program" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise UsageError(f"--port {port}: cannot listen on {host}:{port}: {why}; pick another --port") from None


def _check_size(w: int, h: int, limits) -> None:
    for flag, v in (("--width", w), ("--height", h)):
        if v % limits.size_multiple or not limits.min_size <= v <= limits.max_size:
            raise UsageError(f"{flag} {v}: must be a multiple of {limits.size_multiple} in "
                             f"{limits.min_size}..{limits.max_size} (what a client's start may ask for)")
    if w * h > limits.max_pixels:
        raise UsageError(f"--width {w} --height {h}: width*height must be <= {limits.max_pixels} for this model")


def _one_line_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed HTTP request with a traceback at ERROR: one line at DEBUG instead,
    so a client cannot flood the log."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        log.debug("bad HTTP request: %s", exc)
        return False
    return True

"""`endor serve MODEL`: an OpenAI-compatible HTTP server (/v1/models, /v1/completions,
/v1/chat/completions, streaming as server-sent events, /health) over the offloaded runtime."""

from .args import add_placement, at_least


def add_parser(sub):
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description=__doc__)
    p.add_argument("model", help="a converted checkpoint directory (endor convert)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=at_least(1), default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None,
                   help="the model id clients send (default: the directory's name)")
    add_placement(p)
    p.add_argument("--prefetch", type=at_least(0), default=1, metavar="N",
                   help="layers loading ahead of the one computing (default 1)")
    p.add_argument("--buffered-io", action="store_true",
                   help="read shards buffered and evict them right after, instead of O_DIRECT")
    p.add_argument("--backend", default="auto", help="decoder backend (default auto)")
    p.add_argument("--max-queue", type=at_least(1), default=64, metavar="N",
                   help="requests waiting at most; more get 429 (default 64)")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        from ..integrations.server import serve
    except ImportError as e:
        raise ValueError(f"endor serve needs the 'serve' extra ({e}); run "
                         "`pip install 'endor[serve]'`") from None
    from ..integrations.engine import Engine

    engine = Engine.load(args.model, name=args.name, device=args.device, offload=args.offload,
                         max_memory=args.max_memory, prefetch=args.prefetch,
                         direct_io=not args.buffered_io, backend=args.backend)
    try:
        serve(engine, host=args.host, port=args.port, max_queue=args.max_queue)
    finally:
        engine.model.endor_close()
    return 0

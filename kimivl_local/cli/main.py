"""`kimivl-local`: info | selftest | synthetic | generate | chat | serve | bench | quantize |
download | list | rm.

Every subcommand parses its input and calls the library in-process. User mistakes end with one
line on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..errors import KimiVLError
from .options import load_options

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a program killed by SIGPIPE (`... | head`)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
        return code
    except BrokenPipeError:
        # The reader (`| head`) has gone: stop quietly, and keep the interpreter's own final
        # flush from failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quantize"]:  # its own parser and error handling (quantize/main.py)
        return _quantize_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except KimiVLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("error: out of memory; try --max-context smaller or a quantized checkpoint",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            from .selftest import SELFTEST_HINT

            print(f"note: {SELFTEST_HINT}", file=sys.stderr)
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0]}); try --max-context smaller, "
              "--device cpu, or a quantized checkpoint", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimivl-local",
                                     description="Chat with Kimi-VL-A3B locally, offline.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("info", help="what was built and found: extension, CPU, GPU, model")
    p.add_argument("model", nargs="?", help="optional checkpoint folder or HF repo id to describe")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("selftest", help="check every compiled kernel on this machine against "
                       "its torch reference (include the output in bug reports)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, "
                   "cuda or cuda:N")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("synthetic", help="write a synthetic checkpoint in the official layout")
    p.add_argument("dst", type=Path)
    p.add_argument("--preset", choices=["tiny", "full", "tiny-thinking", "full-thinking"],
                   default="tiny", help="*-thinking: the Kimi-VL-A3B-Thinking-2506 layout")
    p.add_argument("--layers", type=int, help="num_hidden_layers (full preset default 27)")
    p.add_argument("--experts", type=int, help="n_routed_experts (full preset default 64)")
    p.add_argument("--vision-layers", type=int, help="MoonViT blocks (full preset default 27)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)

    for name, func, help_ in [("generate", cmd_generate, "answer one prompt (for scripts)"),
                              ("chat", cmd_chat, "interactive chat in the terminal")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("model_pos", nargs="?", metavar="MODEL", help="checkpoint folder or HF repo id")
        p.add_argument("--model", help="checkpoint folder or HF repo id (same as MODEL)")
        if name == "generate":
            p.add_argument("--prompt", "-p", help="the user message (default: read stdin)")
        p.add_argument("--image", action="append", default=[], type=Path,
                       help="attach an image (repeatable)")
        _media_args(p)
        p.add_argument("--system", help="system prompt (default: the model's)")
        _sampling_args(p)
        _runtime_args(p)
        _fetch_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="measure load time, time to first token, tokens/s, memory")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="checkpoint folder or HF repo id")
    p.add_argument("--model", help="checkpoint folder or HF repo id (same as MODEL)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--image", default="1024x1024", help="WxH of the image for time to first "
                   "token with an image, or none (default 1024x1024)")
    p.add_argument("--json", help="also write the results to this JSON file")
    _runtime_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="the chat app in your browser, plus an OpenAI-compatible API")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="checkpoint folder or HF repo id")
    p.add_argument("--model", help="checkpoint folder or HF repo id (same as MODEL)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=int, default=100,
                   help="largest upload or API request body, in MiB (default 100)")
    _runtime_args(p)
    _fetch_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("download", help="fetch a Hugging Face repo's checkpoint (safetensors, "
                       "JSON, tiktoken.model; never code) into the HF cache")
    p.add_argument("repo", help="e.g. moonshotai/Kimi-VL-A3B-Instruct")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.set_defaults(func=_cache_command("cmd_download"))
    p = sub.add_parser("list", help="checkpoints cached: downloaded, and quantized to fit")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cache_command("cmd_list"))
    p = sub.add_parser("rm", help="remove quantized-to-fit entries from kimivl-local's cache")
    p.add_argument("names", nargs="+", metavar="NAME", help="as `kimivl-local list` names them")
    p.set_defaults(func=_cache_command("cmd_rm"))

    # Listed for --help only: main() hands `quantize ...` to kimivl_local.quantize.main.
    sub.add_parser("quantize", add_help=False,
                   help="compress a bf16 checkpoint (INT4/INT8 recipes, compressed-tensors "
                        "format); see `kimivl-local quantize --help`")
    return parser


def _cache_command(name: str):
    def run(args):
        from . import cache_commands

        return getattr(cache_commands, name)(args)
    return run


def _quantize_main(argv: list[str]) -> int:
    try:
        from ..quantize.main import main as quantize_main
    except ModuleNotFoundError as exc:
        if not exc.name.startswith("kimivl_local"):
            raise
        print("error: the quantize tool is not installed (kimivl_local.quantize); install the "
              "package with `pip install .`", file=sys.stderr)
        return EXIT_USAGE
    return quantize_main(argv)


def _media_args(p: argparse.ArgumentParser) -> None:
    from ..inputs.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES

    p.add_argument("--pdf", action="append", default=[], type=Path,
                   help="attach a PDF, one image per page (repeatable)")
    p.add_argument("--pages", help="pages of each --pdf, 1-based, e.g. 1-3,5 (default: all)")
    p.add_argument("--pdf-text", action="store_true",
                   help="also give each PDF page's text layer as text")
    p.add_argument("--video", action="append", default=[], type=Path,
                   help="attach a video as timestamped frames (repeatable)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS,
                   help=f"video frames per second to sample (default {DEFAULT_FPS:g})")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help=f"at most this many frames per video, spread over the whole clip "
                        f"when it is longer (default {DEFAULT_MAX_FRAMES})")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-context", type=int, help="tokens of context to allocate (default 8192)")
    p.add_argument("--max-image-tokens", type=int,
                   help="raw 14x14 patches per image before down-scaling (default: the model's "
                        "in_token_limit, 4096 for Instruct); lower is faster on slow machines")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="GPU memory to plan for (default: what is free on the device)")
    p.add_argument("--cpu-experts", type=int, metavar="N",
                   help="keep the routed experts of N MoE layers in host memory and run them on "
                        "the CPU (for 6-8 GB GPUs; with --device auto, chosen when needed)")
    p.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                   help="compiled kernels where available (auto), required (kernels), or torch "
                        "only (reference: slow, for debugging)")


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="branch, tag or commit of a repo id (default main)")
    p.add_argument("--download", action="store_true",
                   help="fetch a repo id that is not in the local cache without asking")
    p.add_argument("--fit", action="store_true",
                   help="when the checkpoint does not fit this machine but a quantize recipe "
                        "would, quantize it into kimivl-local's cache without asking (once)")


def _load(args):
    from .. import load
    from .prepare import prepare

    spec = args.model or args.model_pos
    if not spec:
        raise KimiVLError("no model given: pass a checkpoint folder or a Hugging Face repo id, "
                          "e.g. `kimivl-local chat --model moonshotai/Kimi-VL-A3B-Instruct`")
    options = load_options(args)
    folder = prepare(spec, args.revision, download=args.download, fit_flag=args.fit,
                     options=options, max_context=args.max_context)
    t0 = time.perf_counter()
    model = load(folder, max_context=args.max_context, **options)
    print(f"loaded {model.path} on {model.device} ({str(model.dtype).removeprefix('torch.')}) "
          f"in {time.perf_counter() - t0:.1f}s; {model.memory_plan.summary()}", file=sys.stderr)
    return model


def _sampling(args) -> dict:
    """generate()'s sampling keywords, checked here so that a bad value fails before the load."""
    from ..engine.sampling import SamplingParams

    SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    if args.max_new_tokens < 1:
        raise KimiVLError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _media_options(args) -> dict:
    """How this session's PDFs and videos are read (chat's /pdf and /video too)."""
    return {"text_layer": args.pdf_text, "fps": args.fps, "max_frames": args.max_frames}


def _attachments(args) -> list[dict]:
    """Message items for --image, --pdf and --video, each checked (decoded, opened, its page
    range and the video options read) before the model loads."""
    from ..inputs.media import check_item, pdf_item, video_item
    from ..inputs.video import check_options

    check_options(args.fps, args.max_frames, "--fps/--max-frames")
    if args.pages is not None and not args.pdf:
        raise KimiVLError(f"--pages {args.pages} selects pages of a --pdf, and none was given")
    options = _media_options(args)
    items = ([{"type": "image", "image": str(p)} for p in args.image]
             + [pdf_item(p, args.pages, options["text_layer"]) for p in args.pdf]
             + [video_item(p, options["fps"], options["max_frames"]) for p in args.video])
    for item in items:
        check_item(item)
    return items


def _user_message(text: str, items: list[dict]) -> dict:
    if not items:
        return {"role": "user", "content": text}
    return {"role": "user", "content": items + [{"type": "text", "text": text}]}


def cmd_generate(args) -> int:
    sampling, attachments = _sampling(args), _attachments(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    model = _load(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append(_user_message(prompt, attachments))
    for piece in model.generate(messages, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_stats_line(model.last_stats), file=sys.stderr)
    return 0


def _stats_line(stats) -> str:
    return (f"[{stats.prompt_tokens} prompt tokens ({stats.reused_tokens} cached), "
            f"{stats.prefill_tokens_per_second:.1f} tok/s prefill; {stats.generated_tokens} "
            f"generated, {stats.decode_tokens_per_second:.1f} tok/s; {stats.finish_reason}]")


def cmd_chat(args) -> int:
    from .chat_repl import ChatRepl

    sampling, attachments = _sampling(args), _attachments(args)
    return ChatRepl(_load(args), args.system, sampling, attachments, _media_options(args)).run()


def cmd_bench(args) -> int:
    from .benchmark import main_bench

    if not (args.model or args.model_pos):
        raise KimiVLError("no model given: kimivl-local bench MODEL")
    return main_bench(args)


def cmd_serve(args) -> int:
    try:
        from ..app.server import check_port, check_upload_mb, serve
    except ModuleNotFoundError as exc:
        if exc.name.startswith("kimivl_local"):
            raise KimiVLError("the app is not installed (kimivl_local.app); install the package "
                              "with `pip install .`") from None
        raise KimiVLError(f"the app needs {exc.name}: pip install gradio fastapi uvicorn") from None
    check_upload_mb(args.max_upload_mb)  # before the minutes a real checkpoint takes to load
    check_port(args.host, args.port)
    model = _load(args)
    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print(f"chat: {url}/  OpenAI API: {url}/v1  (Ctrl-C to stop)", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this port can use the "
              "model and upload files", file=sys.stderr)
    serve(model, args.host, args.port, args.max_upload_mb)
    return 0


def cmd_synthetic(args) -> int:
    from ..synthetic.checkpoint import write_checkpoint

    text, vision = {}, {}
    if args.layers is not None:
        text["num_hidden_layers"] = args.layers
    if args.experts is not None:
        text["n_routed_experts"] = args.experts
        text["num_experts_per_tok"] = min(6 if args.preset.startswith("full") else 3, args.experts)
    if args.vision_layers is not None:
        vision["num_hidden_layers"] = args.vision_layers
    t0 = time.perf_counter()
    try:
        path = write_checkpoint(args.dst, preset=args.preset, seed=args.seed,
                                text_overrides=text, vision_overrides=vision)
    except FileExistsError as exc:
        raise KimiVLError(str(exc)) from None
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {args.preset} synthetic checkpoint to {path} ({size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def cmd_selftest(args) -> int:
    from .selftest import main_selftest

    return main_selftest(args.device, args.json)


def cmd_info(args) -> int:
    from .info import collect_info, format_info

    info = collect_info(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

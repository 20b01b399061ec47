"""The `flashmoe` command: convert, demo, info, synth, generate, chat."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from . import presets
from .errors import FlashMoEError


def _cmd_convert(args) -> int:
    from .convert import convert

    t0 = time.perf_counter()
    header = convert(args.src, args.dst, bits=args.bits, group_size=args.group_size, progress=not args.quiet,
                     overwrite=args.overwrite)
    from .reader import model_bytes

    size = model_bytes(header)
    src = "MLX " if header["source"].get("format") == "mlx" else ""
    print(f"wrote {args.dst}: {header['architecture']} from {src}{args.src}, {header['quantization']['bits']}-bit, "
          f"{size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return 0


_KINDS = (("embeddings", "embed_tokens."), ("lm_head", "lm_head."), ("attention", ".self_attn."),
          ("deltanet", ".linear_attn."), ("router", ".mlp.gate.weight"), ("shared expert gate", ".shared_expert_gate."),
          ("shared expert", ".shared_expert."), ("dense mlp", ".mlp."))


def tensor_widths(header) -> dict:
    """Tensor kind -> how its matrices are stored ("4-bit", "8-bit", "bf16", "f32", or several)."""
    def width(t):
        if t["dtype"] in ("q4", "q8"):
            return f"{t['dtype'][1]}-bit"
        return t["dtype"]

    kinds: dict = {}
    for name, t in header["dense"]["tensors"].items():
        if len(t["shape"]) != 2 or name.endswith("conv1d.weight"):
            continue  # norms, conv1d, A_log, dt_bias: always f32
        kind = next(k for k, key in _KINDS + (("other", ""),) if key in name or name.startswith(key))
        kinds.setdefault(kind, set()).add(width(t))
    kinds["routed experts"] = {width(t) for t in header["experts"]["tensors"].values()}
    order = ("8-bit", "4-bit", "bf16", "f32")
    return {k: "/".join(sorted(v, key=order.index)) for k, v in kinds.items()}


def _cmd_info(args) -> int:
    from .reader import model_bytes, read_header

    h = read_header(args.model)
    c = h["config"]
    q = h["quantization"]
    n_full = sum(t == "full_attention" for t in c["layer_types"])
    print(f"{args.model}")
    print(f"  architecture   {h['architecture']} ({c.get('model_type')})")
    print(f"  layers         {c['num_hidden_layers']} ({c['num_hidden_layers'] - n_full} DeltaNet + {n_full} attention)")
    print(f"  hidden         {c['hidden_size']}, vocab {c['vocab_size']}")
    print(f"  experts        {c['num_experts']} per layer, {c['num_experts_per_tok']} active, "
          f"ffn {c['moe_intermediate_size']}, shared ffn {c['shared_expert_intermediate_size']}")
    src = h.get("source", {})
    origin = {"mlx": "MLX checkpoint", "hf": "Hugging Face checkpoint"}.get(src.get("format"), "")
    if origin:
        how = "imported exactly" if src.get("format") == "mlx" else "converted"
        print(f"  source         {origin} ({src.get('model_type')}, {src.get('dtype')}), {how} by "
              f"{src.get('converter', 'flashmoe')}")
    bits = f"{q['bits']}-bit" + (f", groups of {q['group_size']}" if q.get("group_size") else "")
    print(f"  quantization   {bits}")
    print(f"  widths         {'; '.join(f'{k} {v}' for k, v in tensor_widths(h).items())}")
    from .model import backends

    print(f"  backends       {', '.join(backends())} (built into this flashmoe; load(..., backend=...))")
    ex = h["experts"]
    print(f"  size           {model_bytes(h) / 1e9:.3f} GB: dense {h['dense']['size'] / 1e9:.3f} GB, "
          f"{len(ex['layers'])} expert files, {ex['stride'] / 1e6:.3f} MB per expert")
    from .model import memory_plan

    plan = memory_plan(args.model, context_length=args.context_length)
    ctx = args.context_length or "default"
    print(f"  min budget     {plan['minimum'] / 1e9:.3f} GB (context {ctx}: KV cache {plan['kv_bytes'] / 1e6:.1f} MB, "
          f"scratch {plan['scratch_bytes'] / 1e6:.1f} MB, one layer's experts); each GB more caches "
          f"{int(1e9 // ex['stride'])} experts")
    return 0


def stats_line(s: dict) -> str:
    """One line of streaming stats for the last call (Model.stats)."""
    last = s["last"]
    return (f"experts: {last['expert_hits']} hits, {last['expert_misses']} misses "
            f"(hit rate {last['hit_rate']:.0%}), {last['prefetches']} prefetched; read "
            f"{last['bytes_read'] / 1e6:.1f} MB at {last['read_gbps']:.2f} GB/s "
            f"(x{last['read_amplification']:.2f} the distinct experts used), "
            f"I/O wait {last['io_wait_seconds']:.2f} s of {last['compute_seconds']:.2f} s"
            f"{'' if s['direct_io'] else ' (buffered reads)'}; backend {s['backend']}")


def _run_demo(path: str, n_tokens: int, seed: int, bits: int, memory_budget=None) -> None:
    import numpy as np

    from .model import load, memory_plan, parse_size
    from .reader import model_bytes, read_header
    from .synth import DEMO_CONFIG, write_random_model

    if not os.path.exists(os.path.join(path, "flashmoe.json")):
        t0 = time.perf_counter()
        write_random_model(path, DEMO_CONFIG, bits=bits, seed=seed, progress=False)
        print(f"wrote a random {bits}-bit Qwen3.5-MoE model to {path} in {time.perf_counter() - t0:.1f} s")
    ctx = 1024
    size = model_bytes(read_header(path))
    if memory_budget is None:  # a third of the model, so that most experts stream from disk
        memory_budget = max(memory_plan(path, context_length=ctx)["minimum"], size // 3)
    model = load(path, memory_budget=memory_budget, context_length=ctx)
    c, mem = model.config, model.memory
    print(f"model: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_experts']} experts "
          f"({c['num_experts_per_tok']} active), vocab {c['vocab_size']}; {size / 1e6:.1f} MB on disk")
    print(f"memory budget {parse_size(memory_budget) / 1e6:.1f} MB ({size / mem['budget']:.1f}x smaller than "
          f"the model): dense {mem['dense_bytes'] / 1e6:.1f} MB, expert cache {mem['expert_slots']} of "
          f"{mem['experts_total']} experts")
    prompt = np.random.default_rng(seed).integers(0, c["vocab_size"], 64)

    out = model.generate_tokens(prompt, max_tokens=n_tokens, stop_token_ids=[])
    s = model.stats
    # The last generated token is not fed back, so decoding ran len(out) - 1 forward steps.
    decode_tps = (len(out) - 1) / max(s["last_decode_seconds"], 1e-9)
    print(f"prompt: {len(prompt)} tokens in {s['last_prompt_seconds']:.3f} s "
          f"({len(prompt) / s['last_prompt_seconds']:.1f} tok/s)")
    print(f"generated {len(out)} tokens: {out[:16]}{' ...' if len(out) > 16 else ''}")
    print(f"decode: {decode_tps:.2f} tok/s")
    print(stats_line(s))


def _cmd_synth(args) -> int:
    from .reader import model_bytes
    from .synth import write_random_model

    cfg = presets.get(args.preset)
    if args.layers is not None:
        cfg = presets.truncate(cfg, args.layers)
    if os.path.exists(os.path.join(args.out, "flashmoe.json")) and not args.overwrite:
        raise ValueError(f"{args.out} already holds a packed model (use --overwrite to replace it)")
    est = presets.model_bytes(cfg, args.bits, args.group_size)["total"]
    where = os.path.abspath(args.out)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if est > free:
        raise OSError(f"{args.out}: the model needs {est / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB")
    t0 = time.perf_counter()
    header = write_random_model(args.out, cfg, bits=args.bits, group_size=args.group_size, seed=args.seed,
                                progress=not args.quiet)
    dt = time.perf_counter() - t0
    size = model_bytes(header)
    n_full = sum(t == "full_attention" for t in cfg["layer_types"])
    print(f"wrote {args.out}: random {args.preset}, {cfg['num_hidden_layers']} layers "
          f"({cfg['num_hidden_layers'] - n_full} DeltaNet + {n_full} attention), {args.bits}-bit, "
          f"{size / 1e9:.2f} GB in {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)")
    return 0


def _cmd_demo(args) -> int:
    if args.dir:
        _run_demo(args.dir, args.tokens, args.seed, args.bits, args.memory_budget)
        return 0
    with tempfile.TemporaryDirectory(prefix="flashmoe-demo-") as d:
        _run_demo(d, args.tokens, args.seed, args.bits, args.memory_budget)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashmoe", description="Run Mixture-of-Experts models larger than memory.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face or MLX checkpoint into the packed format")
    c.add_argument("src", help="checkpoint directory (config.json, *.safetensors): Hugging Face, or MLX (mlx-lm's "
                               "4/8-bit models, imported exactly as they are)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--bits", type=int, choices=(4, 8, 16),
                   help="quantize a Hugging Face checkpoint to this width (default 4); an MLX one keeps its own")
    c.add_argument("--group-size", type=int, help="quantization group size (default 64; MLX: its own)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing packed model at dst")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    d = sub.add_parser("demo", help="write a small random Qwen3.5-MoE model and generate from it")
    d.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    d.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dir", help="keep the demo model in this directory (default: a temporary one)")
    d.add_argument("--memory-budget", help="memory for the engine, e.g. 64MB (default: a third of the model)")
    d.set_defaults(func=_cmd_demo)

    y = sub.add_parser("synth", help="write a random model of a real model's shapes (benchmarks, tests)")
    y.add_argument("out", help="output directory")
    y.add_argument("--preset", required=True, choices=presets.NAMES, help="the model whose shapes to copy")
    y.add_argument("--layers", type=int, help="keep only the first N layers (default: all)")
    y.add_argument("--bits", type=int, choices=(4, 8), default=4)
    y.add_argument("--group-size", type=int, default=64)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--overwrite", action="store_true", help="replace an existing packed model at out")
    y.add_argument("--quiet", action="store_true", help="no progress bar")
    y.set_defaults(func=_cmd_synth)

    i = sub.add_parser("info", help="describe a packed model")
    i.add_argument("model")
    i.add_argument("--context-length", type=int, help="tokens of KV cache for the minimum budget")
    i.set_defaults(func=_cmd_info)

    from .cli_run import add_commands

    add_commands(sub)
    from .server import add_serve_command

    add_serve_command(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FlashMoEError, OSError, ValueError) as exc:
        print(f"flashmoe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

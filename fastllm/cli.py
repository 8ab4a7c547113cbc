"""The `fastllm` command. `fastllm generate "prompt"` prints a completion as it is generated; `fastllm chat`
is an interactive conversation (empty line or Ctrl-D ends it); `fastllm serve` is an OpenAI-compatible
HTTP API (loopback by default) with continuous batching; all use the bundled SmolLM2-135M-Instruct
unless -m names a model directory or .gguf file. `fastllm bench` times each op against torch on this
machine's device (GB/s and the ratios), then a model's prefill and decode tokens/s against transformers.
`fastllm train data.txt` fine-tunes a model (fastllm.train.finetune) and writes checkpoints and a loss plot.
Under torchrun, `fastllm train` is data-parallel and `fastllm generate --tp` tensor-parallel (fastllm.parallel)."""
from __future__ import annotations

import argparse
import sys

import torch


def _bench(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.what in ("ops", "all"):
        rc = _bench_ops(args, device)
        if rc:
            return rc
    if args.what in ("generate", "all"):
        return _bench_generate(args, device)
    return 0


def _bench_generate(args, device: str) -> int:
    """Prefill and decode tokens/s of a model (default: the bundled one), fastllm against transformers."""
    from .llm import LLM
    from .runtime import bench

    print(f"\n# generation: loading {args.model or 'the bundled SmolLM2-135M-Instruct'} on {device} ...",
          file=sys.stderr, flush=True)
    model = LLM.load(args.model, device=device, **_load_options(args)).model
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    weights = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    quantised = sum(1 for m in model.modules() if hasattr(m, "quantized_weight"))
    print(f"# {model.cfg.arch}, {sum(weights.values()) / 2**20:.0f} MiB of weights ({quantised} quantised layers), "
          f"activations {model.tok_embeddings.weight.dtype} (quantised layers: {args.act}), KV cache "
          f"{args.kv_cache or 'float'}, batch {b}, prompt {p} tokens, {n} decode steps")
    rows = {"fastllm": bench.time_fastllm(model, b, p, n)}
    try:
        hf = bench.transformers_model(model)
    except Exception as e:  # a peer that cannot be built is reported, not fatal
        hf, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "transformers is not installed" if hf is None else ""
    if hf is not None:
        rows["transformers"] = bench.time_transformers(hf, b, p, n)
    print(f"{'impl':<14}{'prefill tok/s':>16}{'decode tok/s':>16}{'ms/step':>10}")
    for name, t in rows.items():
        print(f"{name:<14}{t.prefill_tok_s:>16.1f}{t.decode_tok_s:>16.1f}{t.decode_ms:>10.2f}")
    if "transformers" in rows:
        f, t = rows["fastllm"], rows["transformers"]
        print(f"fastllm / transformers: prefill {f.prefill_tok_s / t.prefill_tok_s:.2f}x, "
              f"decode {f.decode_tok_s / t.decode_tok_s:.2f}x")
    else:
        print(f"(no transformers peer: {why})")
    return 0


def _bench_ops(args, device: str) -> int:
    from . import _bench

    ops = args.ops.split(",") if args.ops else _bench.OPS
    unknown = [o for o in ops if o not in _bench.OPS]
    if unknown:
        print(f"fastllm bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(_bench.OPS)}",
              file=sys.stderr)
        return 2
    impls = ("fastllm", "torch") if args.no_compile else _bench.IMPLS
    env = _bench.environment(device)
    print(f"# {env['device_name']} ({device}), torch {env['torch']}, triton {env['triton']}, "
          f"threads {env['cpu_threads']}")
    header = f"{'case':<34}" + "".join(f"{i + ' GB/s':>20}" for i in impls) + f"{'vs torch':>10}"
    if "torch.compile" in impls:
        header += f"{'vs compile':>12}"
    print(header)
    for case in _bench.cases(device, ops):
        rates = {}
        for impl in impls:
            fn = _bench.synchronized(case.make(impl), device)
            rates[impl] = _bench.gbps(case, _bench.time_it(fn, device, min_time=args.min_time))
        line = f"{case.name:<34}" + "".join(f"{rates[i]:>20.1f}" for i in impls)
        line += f"{rates['fastllm'] / rates['torch']:>9.2f}x"
        if "torch.compile" in impls:
            line += f"{rates['fastllm'] / rates['torch.compile']:>11.2f}x"
        print(line, flush=True)
    return 0


def _init_distributed(device: str | None) -> str | None:
    """Under torchrun: the process group (nccl when this rank uses CUDA, else gloo) and this rank's device."""
    import os

    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _load(args):
    from .llm import LLM

    if getattr(args, "tp", False):
        import os

        if "WORLD_SIZE" not in os.environ:
            raise ValueError("--tp runs under torchrun: torchrun --nproc-per-node N -m fastllm.cli generate --tp ...")
        return LLM.load(args.model, device=_init_distributed(args.device), tensor_parallel=True,
                        **_load_options(args))
    return LLM.load(args.model, device=args.device, **_load_options(args))


def _load_options(args) -> dict:
    return dict(act=args.act, kv_cache=args.kv_cache, dtype=args.dtype and getattr(torch, args.dtype))


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _generate(args) -> int:
    llm = _load(args)
    show = getattr(llm.model, "tensor_parallel", None) is None or llm.model.tensor_parallel.rank == 0
    for piece in llm.stream(args.prompt, **_sampling(args)):  # every tensor-parallel rank runs it; rank 0 prints
        if show:
            print(piece, end="", flush=True)
    if show:
        print()
    return 0


def _chat(args) -> int:
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        for piece in llm.chat(messages, stream=True, **_sampling(args)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _train(args) -> int:
    import os

    from .llm import LLM
    from .train import finetune

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one data-parallel process per rank
        device = _init_distributed(device)
    llm = LLM.load(args.model, device=device, dtype=torch.float32)
    out = finetune(llm.model, args.data, llm.tokenizer, steps=args.steps, batch_size=args.batch_size,
                   seq_len=args.seq_len, accum=args.accum, lr=args.lr, weight_decay=args.weight_decay,
                   warmup=args.warmup, clip=args.clip, seed=args.seed, out_dir=args.out, save_every=args.save_every,
                   resume=args.resume, parallel=args.parallel)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {out.step} steps: loss {out.losses[0]:.4f} -> {out.losses[-1]:.4f}; checkpoint in "
              f"{args.out}/final" + (f", loss curve {out.plot}" if out.plot else ""))
    return 0


def _serve(args) -> int:
    try:
        from .serve import serve
    except ImportError as e:
        print(f"fastllm serve needs fastapi and uvicorn (pip install 'fastllm[serve]'): {e}", file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, device=args.device, api_key=args.api_key,
          max_seqs=args.max_seqs, max_queue=args.max_queue, context_len=args.context_len,
          kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, load_options=_load_options(args))
    return 0


def _runtime_args(p) -> None:
    p.add_argument("--act", choices=("float", "int8"), default="float",
                   help="activations of the quantised layers: float (exact, default) or int8 (faster on CPU)")
    p.add_argument("--kv-cache", choices=("int8",), help="an int8 KV cache (a quarter of fp32's bytes, half of bf16's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the activations' dtype (default: bfloat16 on CUDA, float32 on CPU; bfloat16 on a CPU with "
                        "AVX512_BF16 runs its bfloat16 dot products)")


def _model_args(p, max_new_tokens: int) -> None:
    p.add_argument("-m", "--model", help="a Hugging Face model directory or a .gguf file (default: SmolLM2-135M)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    _runtime_args(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a string that ends the text (repeatable)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time fastllm's ops against torch, and generation against transformers")
    bench.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--ops", help="comma-separated subset of softmax,layer_norm,rms_norm")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    bench.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per case and peer")
    bench.add_argument("--what", choices=("ops", "generate", "all"), default="all",
                       help="the ops against torch, generation tokens/s against transformers, or both (default)")
    bench.add_argument("-m", "--model", help="model for the generation benchmark (default: SmolLM2-135M)")
    bench.add_argument("--batch", type=int, default=1, help="generation benchmark: prompts per batch")
    bench.add_argument("--prompt-len", type=int, default=128, help="generation benchmark: prompt tokens")
    bench.add_argument("--new-tokens", type=int, default=32, help="generation benchmark: decode steps")
    _runtime_args(bench)
    gen = sub.add_parser("generate", help="complete a prompt, printing the text as it is generated")
    gen.add_argument("prompt")
    gen.add_argument("--tp", action="store_true", help="tensor-parallel over the torchrun processes "
                     "(torchrun --nproc-per-node N -m fastllm.cli generate --tp ...; nccl on GPUs, gloo on CPU)")
    _model_args(gen, 128)
    chat = sub.add_parser("chat", help="an interactive conversation with the model's chat template")
    chat.add_argument("--system", help="a system message")
    _model_args(chat, 512)
    train = sub.add_parser("train", help="fine-tune a model (float32 weights, bf16 autocast on CUDA) on a file")
    train.add_argument("data", help="a .txt file, or .jsonl with {\"text\": ...} or {\"messages\": [...]} per line")
    train.add_argument("-m", "--model", help="a Hugging Face model directory or a .gguf file (default: SmolLM2-135M)")
    train.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    train.add_argument("--out", default="fastllm-train", help="checkpoints and loss.png go here")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine schedule)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    train.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    train.add_argument("--resume", help="a checkpoint directory to continue from")
    train.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                       help="under torchrun: replicate the model (ddp, default) or shard it (fsdp)")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (completions, chat, streaming)")
    srv.add_argument("-m", "--model", help="a Hugging Face model directory or a .gguf file (default: SmolLM2-135M)")
    srv.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    srv.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together (KV cache rows)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting to start; more get 429")
    srv.add_argument("--context-len", type=int, help="positions per sequence, prompt + max_tokens "
                                                     "(default: the model's, at most 2048)")
    srv.add_argument("--kv-cache-tokens", type=int, help="positions in the paged KV cache, shared by all "
                                                         "sequences (default: 8 x context-len)")
    srv.add_argument("--block-size", type=int, default=16, help="positions per KV cache block")
    _runtime_args(srv)
    args = parser.parse_args(argv)
    commands = {"bench": _bench, "generate": _generate, "chat": _chat, "train": _train, "serve": _serve}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastllm {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

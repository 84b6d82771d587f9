"""The ``kvpress-like`` command line: ``list``, ``demo``, ``eval``, ``ablate``, ``bench``, ``probe``, ``train-scorer``.

On a busy CPU, set ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch starts):
OpenMP threads that spin while another process holds the cores made every forward up to 10× slower here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kvpress_like.catalog import format_catalog, list_parts


def _json_or_name(text: str):
    """A part override from the command line: a JSON object (``{"pooling": "avg"}``) or a part name."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    return text


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or a local transformers folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed (Ray)")
    group.add_argument("--ray", nargs="?", const="auto", metavar="auto|local|ADDRESS",
                       help="run the units on Ray actors: auto (a running cluster; the value when none is given), "
                            "local (start Ray here), HOST:PORT or ray://HOST:PORT; needs pip install '.[ray]'")
    group.add_argument("--ray-num-cpus", type=float, help="CPUs of each actor (default 1)")
    group.add_argument("--ray-num-gpus", type=float, help="GPUs of each actor (default 0)")
    group.add_argument("--ray-actors", type=int, help="number of actors (default: as many as the cluster holds)")


def _batch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples whose prompts share one left-padded prompt forward (default 1; the records "
                             "are those of samples run alone)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-like", description="KV-cache compression for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show every registered method and part with its options")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    demo = commands.add_parser("demo", help="needle-in-a-haystack demo on the embedded SmolLM2-135M")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--context-tokens", type=int, default=1500)
    demo.add_argument("--depth", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=3)

    ev = commands.add_parser("eval", help="evaluate methods × budgets on generated tasks or a JSONL of samples")
    _model_options(ev)
    ev.add_argument("--method", action="append",
                    help="registered method (repeatable; default dapq; 'full' = the reference)")
    ev.add_argument("--budget", action="append",
                    help="budget: tokens (256), ratio (0.1) or percent ('10%%'); repeatable")
    for kind in ("window", "scorer", "allocator", "selector"):
        ev.add_argument(f"--{kind}", type=_json_or_name,
                        help=f"{kind} override for every method: a name or JSON options")
    ev.add_argument("--task", action="append", help="task name (repeatable; default single_needle)")
    ev.add_argument("--data", help="JSONL of samples to evaluate instead of generated tasks")
    ev.add_argument("--length", type=int, action="append", help="context tokens (repeatable; default 1024)")
    ev.add_argument("--depths", type=float, nargs="+", help="needle depths cycled through the samples")
    ev.add_argument("--samples", type=int, default=10, help="samples per task and length")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--protocol", action="append", choices=["question_aware", "query_agnostic"],
                    help="protocol (repeatable; default both)")
    ev.add_argument("--max-new-tokens", type=int, help="cap on answer tokens (default: each task's own cap)")
    ev.add_argument("--no-answer-prefix", action="store_true", help="do not open the assistant turn with a prefix")
    ev.add_argument("--no-attention-metrics", action="store_true", help="skip attention recall / similarity")
    ev.add_argument("--save-samples", help="also write the generated samples to this JSONL file")
    ev.add_argument("--out", default="results/eval", help="output folder (resumable)")
    _batch_option(ev)
    ev.add_argument("--prompt-chunk", type=int,
                    help="progressive prefill of every method: the prompt in chunks of this many tokens")
    ev.add_argument("--interim-factor", type=float, default=1.0,
                    help="with --prompt-chunk: each layer keeps this many times its budget between chunks")
    _ray_options(ev)

    ab = commands.add_parser("ablate", help="run (or resume) a YAML grid: methods × windows × budgets × lengths × …")
    ab.add_argument("grid", help="YAML grid file (see kvpress_like.eval.grid)")
    ab.add_argument("--out", help="output folder (default results/<grid name>); finished cells are skipped")
    ab.add_argument("--samples", type=int, help="override the grid's samples per task and length")
    ab.add_argument("--limit", type=int, help="run at most this many cells now (for timing a grid)")
    ab.add_argument("--threads", type=int, default=None)
    ab.add_argument("--no-progress", action="store_true")
    _batch_option(ab)
    _ray_options(ab)

    be = commands.add_parser("bench", help="prefill/compression time ratio, decode ms/token, cache bytes, peak memory")
    _model_options(be)
    be.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    be.add_argument("--methods", nargs="+", default=["all"],
                    help="registered methods ('all' = every one but full; name full: our prefill, nothing dropped)")
    be.add_argument("--budget", default="256", help="budget of every method (default 256 tokens, as the paper)")
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument("--decode-tokens", type=int, default=32)
    be.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (a fresh process per case)")
    be.add_argument("--chunk-size", type=int, help="run the methods' MLPs in row chunks of this many tokens")
    be.add_argument("--prompt-chunk", type=int,
                    help="progressive prefill: feed the prompt this many tokens at a time, compressing after each")
    be.add_argument("--memory-repeats", type=int, default=1, help="fresh processes per peak-memory case (median)")
    be.add_argument("--out", default="results/bench")

    pr = commands.add_parser("probe", help="'where > what': the DapQ paper's Table 1 and window recall on a model")
    _model_options(pr)
    pr.add_argument("--length", type=int, default=2048, help="context tokens of each sample")
    pr.add_argument("--samples", type=int, default=16)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--n-true", type=int, default=32, help="true decoding tokens (and pseudo tokens) compared")
    pr.add_argument("--window-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    pr.add_argument("--budgets", nargs="+", default=["5%", "10%", "20%"])
    pr.add_argument("--out", default="results/probe")

    tr = commands.add_parser("train-scorer", help="fit a learned scorer (KVzap) for a model from a teacher's scores")
    tr.add_argument("model", help="embedded model name or a local transformers folder")
    tr.add_argument("--teacher", required=True, help="registered method whose scores are learned (kvzip, dapq, …)")
    tr.add_argument("--teacher-options", type=json.loads, default={},
                    help='JSON part overrides of the teacher, e.g. \'{"allocator": "global_layers"}\'')
    tr.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    tr.add_argument("--out", required=True, help="artifact folder (a stopped collection in it resumes)")
    from kvpress_like.train_scorer import TrainingSettings

    for name, info in TrainingSettings.model_fields.items():
        if name != "kind":
            tr.add_argument(f"--{name.replace('_', '-')}", type=type(info.default), default=info.default,
                            help=f"{info.description or name} (default {info.default})")
    tr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "kvpress-like " + shlex.join(sys.argv[1:] if argv is None else argv)

    if args.command == "list":
        catalog = list_parts()
        print(json.dumps(catalog, indent=2, default=str) if args.json else format_catalog(catalog))
    elif args.command == "demo":
        from kvpress_like.eval.demo import run_demo

        print(run_demo(args.model, args.context_tokens, args.depth, args.seed))
    elif args.command == "eval":
        return _eval(args, command)
    elif args.command == "ablate":
        return _ablate(args, command)
    elif args.command == "bench":
        return _bench(args, command)
    elif args.command == "probe":
        return _probe(args, command)
    elif args.command == "train-scorer":
        return _train_scorer(args)
    return 0


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load(args):
    import torch

    from kvpress_like.models import load_model

    _set_threads(args.threads)
    return load_model(args.model, dtype=getattr(torch, args.dtype))


def _eval(args, command: str) -> int:
    from kvpress_like.eval.grid import parse_grid
    from kvpress_like.eval.tasks import DEFAULT_DEPTHS, make_samples, save_jsonl

    ray = _ray_settings(args)
    overrides = {k: getattr(args, k) for k in ("window", "scorer", "allocator", "selector") if getattr(args, k)}
    methods = [{"method": m, **({} if m == "full" else overrides)} for m in (args.method or ["dapq"])]
    raw = {
        "name": "eval", "model": args.model, "dtype": args.dtype,
        "tasks": args.task or ["single_needle"], "data": args.data, "lengths": args.length or [1024],
        "depths": args.depths or list(DEFAULT_DEPTHS), "samples": args.samples, "seed": args.seed,
        "protocols": args.protocol or ["question_aware", "query_agnostic"], "budgets": args.budget or ["10%"],
        "methods": methods, "max_new_tokens": args.max_new_tokens, "answer_prefix": not args.no_answer_prefix,
        "attention_metrics": not args.no_attention_metrics, "threads": args.threads,
        "batch_size": 1 if args.batch_size is None else args.batch_size, "prompt_chunk": args.prompt_chunk,
        "interim_factor": args.interim_factor,
    }
    grid = parse_grid(raw, "eval options")
    if ray:
        from kvpress_like.eval.distributed import load_tokenizer

        model, tokenizer = None, load_tokenizer(args.model)  # the Ray actors load the model
    else:
        model, tokenizer = _load(args)
    if args.save_samples and not args.data:
        samples = [s for t in grid.tasks for n in grid.lengths
                   for s in make_samples(tokenizer, t.name, n, grid.samples, grid.seed, grid.depths, **t.options)]
        print(f"wrote {len(samples)} samples to {save_jsonl(samples, args.save_samples)}")
    _run_grid(args, ray, grid, args.out, command, model=model, tokenizer=tokenizer)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def _ray_settings(args):
    """The validated ``--ray`` options, or None for a run in this process."""
    if not args.ray:
        return None
    from kvpress_like.eval.distributed import ray_settings

    return ray_settings(address=args.ray, num_cpus=args.ray_num_cpus, num_gpus=args.ray_num_gpus,
                        actors=args.ray_actors)


def _run_grid(args, ray, grid, out: str, command: str, model=None, tokenizer=None, limit: int | None = None) -> dict:
    """``run_grid`` here and its summary, or ``run_grid_ray`` with the ``ray`` settings; returns the summary."""
    if ray is None:
        from kvpress_like.eval.runner import run_grid
        from kvpress_like.eval.summary import write_run_summary

        run = run_grid(grid, out, model, tokenizer, progress=not args.no_progress, limit=limit)
        return write_run_summary(grid, run, command)
    from kvpress_like.eval.distributed import run_grid_ray

    return run_grid_ray(grid, out, ray, tokenizer, progress=not args.no_progress, limit=limit, command=command)


def _ablate(args, command: str) -> int:
    from kvpress_like.eval.grid import load_grid

    ray = _ray_settings(args)
    grid = load_grid(args.grid, samples=args.samples, threads=args.threads, batch_size=args.batch_size)
    out = args.out or str(Path("results") / grid.name)
    summary = _run_grid(args, ray, grid, out, command, limit=args.limit)
    timing = summary["timing"]
    print(f"{timing['cells']} cells in {out} ({timing['cells_run_now']} run now in {timing['run_seconds_now']} s; "
          f"{timing['cell_seconds_mean']} s per cell); summary: {Path(out) / 'summary.md'}")
    return 0


def _bench(args, command: str) -> int:
    from kvpress_like.eval.bench import bench_markdown, run_bench, write_bench
    from kvpress_like.eval.grid import MethodEntry, candidate
    from kvpress_like.factory import needs_budget
    from kvpress_like.plugins import get_registry

    names = args.methods
    if names == ["all"]:  # the plain prefill is every ratio's baseline: methods that keep everything are left out
        names = [name for name in sorted(get_registry().methods) if needs_budget(name)]
    # a method that keeps everything, named on purpose, is our prefill without compression
    methods = [(name, candidate(MethodEntry(method=name), args.budget).pipeline) for name in names]
    model, tokenizer = _load(args)
    memory = None if args.no_memory else {"model": args.model, "budget": args.budget, "threads": args.threads,
                                          "repeats": args.memory_repeats}
    result = run_bench(model, tokenizer, methods, args.lengths, args.repeats, args.decode_tokens,
                       memory=memory, progress=not args.no_progress, chunk_size=args.chunk_size,
                       prompt_chunk=args.prompt_chunk)
    write_bench(result, args.out, args.model, command)
    print(bench_markdown(result, args.model, command))
    return 0


def _probe(args, command: str) -> int:
    from kvpress_like.eval.probe import ProbeSettings, probe_markdown, run_probe, write_probe

    model, tokenizer = _load(args)
    settings = ProbeSettings(length=args.length, samples=args.samples, seed=args.seed, n_true=args.n_true,
                             window_sizes=tuple(args.window_sizes), budgets=tuple(args.budgets))
    result = run_probe(model, tokenizer, settings, progress=not args.no_progress)
    write_probe(result, args.out, args.model, command)
    print(probe_markdown(result, args.model, command))
    return 0



def _train_scorer(args) -> int:
    from kvpress_like.train_scorer import TrainingSettings, teacher_pipeline, train_scorer

    settings = TrainingSettings(**{name: getattr(args, name) for name in TrainingSettings.model_fields})
    model, tokenizer = _load(args)
    teacher = teacher_pipeline(args.teacher, tokenizer, args.teacher_options)

    def progress(items):
        if args.no_progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, total=settings.docs, desc=f"collecting {args.teacher} scores", unit="doc")

    surrogate = train_scorer(model, tokenizer, teacher, args.out, settings, args.model, progress=progress)
    metrics = surrogate.meta["metrics"].values()
    r2 = sorted(m["r2"] for m in metrics)
    rho = sorted(m["spearman"] for m in metrics)
    print(f"wrote {args.out}: {len(surrogate.layers)} layers, held-out R² {r2[0]:.3f}–{r2[-1]:.3f} "
          f"(median {r2[len(r2) // 2]:.3f}), within-document Spearman {rho[0]:.3f}–{rho[-1]:.3f} "
          f"(median {rho[len(rho) // 2]:.3f}); collect {surrogate.meta['seconds']['collect']} s, "
          f"fit {surrogate.meta['seconds']['fit']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``routemem train | eval | sample | export-hf | corpora | bench | reproduce | pretrain-vit``.

A mistake the user can fix (bad path, config typo, corrupt checkpoint) prints one line
``routemem: error: ...`` and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from routemem.cli_parser import HelpWithLayers, RoutememParser
from routemem.errors import TrainingDiverged, UserError
from routemem.fileio import check_output_path

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # inside the package: a wheel has them too


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a shipped config (``charlm-quick`` -> routemem/configs/charlm-quick.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise UserError(f"config file not found: {name}")


def _saved_run_config(out: str) -> dict:
    """The config of the run in ``out`` (from its checkpoint), as the base of ``--resume`` without
    ``--config``. ``train.stop_at`` belongs to the invocation that stopped, so it is reset."""
    from routemem.train import checkpoint as ckpt_io

    own = Path(out) / ckpt_io.CKPT_DIRNAME
    if not own.exists():
        return {}  # the Trainer says that there is nothing to resume
    data = ckpt_io.read_checkpoint(own)["config"]
    data.get("train", {}).pop("stop_at", None)
    return data


def cmd_train(args) -> int:
    from routemem.config import apply_overrides, from_dict, load_yaml
    from routemem.data.corpora import check_data_dir
    from routemem.train import RunConfig, Trainer
    from routemem.train.summary import format_summary

    if args.resume and args.resume_from:
        raise UserError("--resume continues the run in --out, --resume-from starts a new run in --out "
                        "from another run's checkpoint: pass only one of them")
    check_output_path(args.out, "--out", folder=True)
    check_data_dir(args.data_dir)
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.config:
        base = load_yaml(resolve_config_path(args.config))
    else:
        base = _saved_run_config(args.out) if args.resume else {}
    data = apply_overrides(base, overrides)
    config = from_dict(RunConfig, data)
    trainer = Trainer(config, args.out, resume=args.resume_from or (True if args.resume else None))
    given_vocab = data.get("model", {}).get("vocab_size")
    if given_vocab is not None and given_vocab != trainer.model_config.vocab_size and trainer.dist.is_main:
        # a warning, not an error: a config copied from a run's config.yaml carries its tokenizer's size
        warn(f"model.vocab_size={given_vocab} is replaced by the tokenizer's vocabulary size "
             f"{trainer.model_config.vocab_size} (the vocabulary always comes from data.tokenizer)")
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(json.dumps(result) if args.json else format_summary(result, args.out, trainer.cfg.train.max_steps))
    return 0


def cmd_eval(args) -> int:
    import torch

    from routemem.data import load_corpus, load_splits
    from routemem.data.corpora import check_data_dir
    from routemem.train import evaluate, load_model

    check_data_dir(args.data_dir)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model, tokenizer, config = load_model(args.ckpt)
    data = config.get("data", {})
    corpus_name = args.corpus or data.get("corpus")
    corpus = load_corpus(corpus_name, args.data_dir or data.get("data_dir"))
    warn_unknown_chars(tokenizer, corpus.text, f"corpus '{corpus_name}'")
    splits = load_splits(corpus, tokenizer, data.get("cache_dir"))
    seq_len = data.get("seq_len") or model.config.max_seq_len
    metrics = evaluate(model, splits[args.split], seq_len=seq_len, batch_size=args.batch_size,
                       tokenizer=tokenizer, max_tokens=args.max_tokens, device=torch.device("cpu"),
                       name=f"corpus '{corpus_name}' split '{args.split}'")
    print(json.dumps({"ckpt": str(args.ckpt), "corpus": corpus_name, "split": args.split,
                      "corpus_sha256": corpus.sha256, **metrics}))
    return 0


def cmd_sample(args) -> int:
    import torch

    from routemem.train import load_model

    if args.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {args.tokens}")
    if not 0 < args.temperature < math.inf:  # 0 or less would divide by zero or flip the distribution,
        # inf would make every token equally likely and nan every probability nan
        raise UserError(f"--temperature must be a finite number > 0, got {args.temperature} (a small value "
                        "such as 0.01 is close to greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k} (leave it out to sample from every token)")
    model, tokenizer, _ = load_model(args.ckpt)
    ids = tokenizer.encode(args.prompt)
    if len(ids) == 0:
        raise UserError("--prompt is empty: give at least one character")
    if len(ids) > model.config.max_seq_len:
        raise UserError(f"--prompt is {len(ids)} tokens, longer than the model's max_seq_len={model.config.max_seq_len}")
    warn_unknown_chars(tokenizer, args.prompt, "--prompt")
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.as_tensor(ids.astype("int64"))[None]
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)
    print(tokenizer.decode(out[0].numpy()))
    return 0


def cmd_export_hf(args) -> int:
    check_output_path(args.out, "--out", folder=True)
    try:
        from routemem.integrations.hf.convert import export_checkpoint, import_checkpoint
    except ImportError as err:
        if err.name is None or not err.name.startswith("transformers"):
            raise
        raise UserError("export-hf needs transformers: pip install 'routemem[hf]'") from None
    convert = export_checkpoint if args.to == "hf" else import_checkpoint
    print(convert(args.ckpt, args.out))
    return 0


def warn(message: str) -> None:
    """One stderr line about something the user may not expect; the command goes on."""
    print(f"routemem: warning: {message}", file=sys.stderr)


def warn_unknown_chars(tokenizer, text: str, what: str) -> None:
    """One stderr line when a char tokenizer will read characters of ``text`` as "unknown" (id 0)."""
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        shown = " ".join(repr(c) for c in unknown[:20]) + more
        warn(f"{what} has {len(unknown)} character(s) the checkpoint's char tokenizer never saw, read as "
             f"'unknown': {shown}")


def cmd_corpora(args) -> int:
    from routemem.data import list_corpora
    from routemem.data.corpora import check_data_dir

    check_data_dir(args.data_dir)
    rows = list_corpora(args.data_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        size = f"{row['chars']:>10,} chars" if row["available"] else " " * 16
        status = "available" if row["available"] else f"unavailable: {row.get('reason', '')}"
        print(f"{row['name']:<12} {size}  {status}")
    return 0


def cmd_bench(args) -> int:
    from routemem.bench import run_suite

    if args.out is not None:  # checked now: measurements taken are not to be lost to a bad path
        check_output_path(args.out, "--out", folder=False)
    # run_suite checks the suite name and the device before it measures anything
    result = run_suite(args.suite, quick=args.quick, out=args.out, device=args.device, compile=args.compile)
    print(json.dumps(result, indent=2))
    return 0


def cmd_reproduce(args) -> int:
    from routemem.data.corpora import check_data_dir
    from routemem.experiments import STUDIES
    from routemem.experiments.shared.runner import Shard, parse_jobs, parse_threads

    threads = parse_threads(args.threads)
    set_study_threads(threads)
    # before any study runs: a results folder that cannot be made, or a data folder that is not
    # there, would otherwise surface as a traceback, after the training
    check_output_path(args.out, "--out", folder=True)
    check_data_dir(args.data_dir)
    if args.study == "all":
        return cmd_reproduce_all(args)
    if args.force:
        raise UserError(f"--force applies to 'all' only; a single study reuses the finished runs in "
                        f"{Path(args.out) / args.study / 'runs'}: delete that folder to train them again")
    if args.study not in STUDIES:
        known = ", ".join(sorted(STUDIES)) or "none yet"
        raise UserError(f"unknown study '{args.study}' (available: {known}, or all)")
    extra = {}
    if args.pair is not None:
        if args.study != "apn":
            raise UserError(f"--pair applies to the apn study only, not '{args.study}'")
        extra["pair"] = args.pair
    if args.setting is not None:
        if args.study != "palimpsa":
            raise UserError(f"--setting applies to the palimpsa study only, not '{args.study}'")
        extra["setting"] = args.setting
    jobs, shard = parse_jobs(args.jobs), Shard.parse(args.shard) if args.shard is not None else None
    if args.compile:  # passed only when asked, so a study's run() without the option still runs plain
        extra["compile"] = True
    out = STUDIES[args.study](out=Path(args.out), quick=args.quick, data_dir=args.data_dir, device=args.device,
                              jobs=jobs, shard=shard, threads=threads, **extra)
    if shard is not None:
        print(f"shard {out['shard']}: trained {out['trained']} run(s), {out['reused']} already cached, in "
              f"{out['runs_dir']}; no report written (run the same command without --shard once every "
              "shard has finished to assemble it)")
        return 0
    from routemem.experiments.shared.common import verdict_lines

    print("\n".join(verdict_lines(out, Path(args.out) / args.study / "report.md")))
    return 0


def set_study_threads(threads: int) -> None:
    """This process's torch threads for a study: each run trains on ``threads`` (the runner sets the
    same in its workers), and results.json's machine header then records that count."""
    import torch

    torch.set_num_threads(threads)


def cmd_reproduce_all(args) -> int:
    """Every study into OUT (resumable, see routemem/experiments/suite/run.py), then OUT/REPORT.md and
    OUT/report.html; exit 1 when a study failed (the others still ran and are reported)."""
    from routemem.experiments.suite.run import failed, run_suite
    from routemem.experiments.suite.html import write_page
    from routemem.experiments.suite.report import summary_lines, write_report

    if args.pair is not None:
        raise UserError("--pair applies to the apn study only; 'all' runs apn with its default pair")
    if args.shard is not None:
        raise UserError("--shard applies to one study; run 'routemem reproduce <study> --shard I/N' per study")
    if args.setting is not None:
        raise UserError("--setting applies to the palimpsa study only; 'all' runs each study's quick or full setting")
    manifest = run_suite(args.out, quick=args.quick, data_dir=args.data_dir, device=args.device, jobs=args.jobs,
                         force=args.force, threads=args.threads, compile=args.compile)
    report, page = write_report(args.out), write_page(args.out)
    print("\n".join(summary_lines(args.out) + [f"report: {report}", f"page:   {page}"]))
    return 1 if failed(manifest) else 0


def cmd_pretrain_vit(args) -> int:
    from routemem.machine import resolve_device
    from routemem.models.vit import ViTConfig
    from routemem.train.vit_pretrain import (
        PretrainSettings,
        check_out_path,
        load_pretraining_images,
        pretrain_vit,
        write_pretrained,
    )

    given = {name: value for name, value in vars(args).items() if value is not None}
    defaults = PretrainSettings()
    steps, batch_size = given.get("steps", defaults.steps), given.get("batch_size", defaults.batch_size)
    lr, val_share = given.get("lr", defaults.lr), given.get("val_share", defaults.val_share)
    # every check before the data is loaded or a step is taken: a mistake costs no time, writes nothing
    PretrainSettings(steps=steps, batch_size=batch_size, lr=lr, val_share=val_share)
    out = check_out_path(args.out)
    device = resolve_device(args.device)
    shape = {field: given[flag] for flag, field in (("image_size", "image_size"), ("patch", "patch_size"),
                                                    ("d_model", "d_model"), ("layers", "n_layer"),
                                                    ("heads", "n_head")) if flag in given}
    config = ViTConfig(**shape)
    config = ViTConfig(**{**shape, "mlp_hidden": 4 * config.d_model})
    if args.max_classes is not None and args.max_classes < 2:
        raise UserError(f"--max-classes must be >= 2, got {args.max_classes}")
    if args.samples_per_class < 2:
        raise UserError(f"--samples-per-class must be >= 2 (one to train on, one to validate), got "
                        f"{args.samples_per_class}")
    images = load_pretraining_images(args.source, size=config.image_size, samples_per_class=args.samples_per_class,
                                     max_classes=args.max_classes, color=args.color, all_classes=args.all_classes)
    model, record = pretrain_vit(config, images, steps=steps, batch_size=batch_size, lr=lr, seed=args.seed,
                                 device=device, val_share=val_share, progress=not args.quiet)
    weights, sidecar = write_pretrained(model, record, out)
    print(f"pretrain-vit: {record['n_classes']} classes of {record['source']}, {steps} steps in "
          f"{record['seconds']:.0f} s: val accuracy {record['val_accuracy']:.3f} (top-5 {record['val_top5']:.3f}, "
          f"chance {record['chance']:.4f}); wrote {weights} and {sidecar}")
    return 0


def _reproduce_description() -> str:
    from routemem.experiments import ABOUT, QUICK_SECONDS

    def quick(name: str) -> str:
        idle, busy = QUICK_SECONDS[name]
        return f"\n             --quick: {idle / 60:.1f} min idle, {busy / 60:.1f} min beside a busy process"

    return "Run a paper's experiment; writes OUT/<study>/{results.json, report.md, *.png}.\n" + \
        "Quick times: one thread, measured on a 2-core VM (Intel Xeon, 2026-12-07).\n\nstudies:\n" + \
        "\n".join(f"  {name:<10} {text}{quick(name) if name in QUICK_SECONDS else ''}"
                  for name, text in ABOUT.items()) + \
        "\n  all        every study above into OUT, in order, then OUT/REPORT.md and OUT/report.html (one " \
        "table of\n             every claim); resumable: a study complete in OUT with the same mode, " \
        "setting and --compile\n             is reused (OUT/suite.json); a failed study is reported and the " \
        "others still run (exit 1)"


def build_parser() -> argparse.ArgumentParser:
    # the docstring's first line, without its reStructuredText ``quotes``
    parser = RoutememParser(prog="routemem", description=__doc__.splitlines()[0].replace("``", ""), add_help=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action=HelpWithLayers, help="show this help message and exit")
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands get RoutememParser too

    p = sub.add_parser("train", help="train a language model from a YAML config", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.takes_overrides = True
    p.add_argument("-h", "--help", action=HelpWithLayers, help="show this help message and exit")
    p.add_argument("--config", help="YAML file or shipped config name (e.g. charlm-quick)")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, ckpt/, final.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its own config unless --config "
                        "is given; overrides may change only schedule-neutral keys (logging, evals, stop_at, "
                        "device, threads, compile)")
    p.add_argument("--resume-from", metavar="CKPT", help="continue from another run's checkpoint, into --out")
    p.add_argument("--data-dir", help="folder holding file corpora (default $ROUTEMEM_DATA)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line instead of the summary (final.json has it too)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, anywhere on the line (e.g. train.max_steps=200 model.mixer=gla); "
                        "with --resume and no --config they apply to the run's own config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a checkpoint on a corpus split; prints one JSON object")
    p.add_argument("--ckpt", required=True, help="run directory or its ckpt/ folder")
    p.add_argument("--corpus", help="corpus name (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export-hf", help="convert a checkpoint to a transformers model folder (from_pretrained), "
                                         "or back with --to routemem")
    p.add_argument("--ckpt", required=True, help="what to convert: a run directory or its ckpt/ folder (--to hf), "
                                                 "a folder written by export-hf (--to routemem)")
    p.add_argument("--out", required=True, help="the new folder (missing or empty)")
    p.add_argument("--to", choices=["hf", "routemem"], default="hf",
                   help="hf: a transformers folder; routemem: a run directory holding ckpt/ (default %(default)s)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("corpora", help="list the named corpora, their sizes and availability")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_corpora)

    # names and one-line descriptions only: importing them loads no torch
    from routemem.bench import SUITES

    suites = "\n".join(f"  {name:<10} {what}" for name, what in SUITES.items())
    p = sub.add_parser("bench", help="run a benchmark suite; prints JSON",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a benchmark suite and print its JSON: rows of measurements, targets\n"
                                   "with ratio, threshold and met, and the machine header. The fields are\n"
                                   "described in `python -m pydoc routemem.bench` and in full in\n"
                                   "docs/benchmarks.md of the source repository (a wheel has no docs/).",
                       epilog=f"suites:\n{suites}")
    p.add_argument("suite", help=f"one of: {', '.join(SUITES)}")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="where tensors and models run (default auto: cuda when available); on cuda the "
                        "CPU-only forms are skipped, with the reason recorded")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats (a smoke run)")
    p.add_argument("--compile", action="store_true",
                   help="time every module and op through torch.compile(fullgraph=True) (env.compile records "
                        "it; a form that does not compile is a skipped row saying why). Each compile is paid "
                        "up front, untimed: measured up to 35 s per op or model on a 2-core VM (Intel Xeon), "
                        "1-6 s once torch's on-disk cache holds it, so a quick suite takes minutes longer. "
                        "The train suite always times compiled against eager training steps; with --compile "
                        "its Trainer-vs-plain rows are compiled too")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("reproduce", help="run a paper's experiment; writes OUT/<study>/results.json",
                       description=_reproduce_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.dash_values = ("--shard",)  # I/N: '-1/2' must reach the check that says 0 <= I < N
    p.add_argument("study", help="which study (listed above), or all")
    p.add_argument("--out", default="results", help="results go to OUT/<study>/ (default: results)")
    p.add_argument("--quick", action="store_true", help="the small setting: minutes, not hours, on a CPU")
    p.add_argument("--data-dir", help="folder holding file corpora (default $ROUTEMEM_DATA)")
    p.add_argument("--pair", metavar="A:B", help="apn: domain pair, e.g. pydocs:pycode (default: "
                   "shakespeare:warandpeace when the data folder has them)")
    p.add_argument("--setting", metavar="NAME", help="palimpsa: a shipped setting by name: quick, full (the "
                   "default) or paper (the paper's MQAR scale: vocab 8192, d_model 128, up to seq_len 1024; a GPU job)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="where to train (auto: cuda when torch sees a GPU)")
    p.add_argument("--jobs", default="1", metavar="N",
                   help="train N runs at once in worker processes, each with --threads threads "
                        "(on cuda all share the one GPU)")
    p.add_argument("--threads", default="1", metavar="T",
                   help="CPU threads per run (default 1). Beside one busy process on a 2-core VM, two threads "
                        "ran a quick study 4-15x slower than idle, one thread 4-24%% slower; idle, two threads "
                        "were 1.3-1.5x faster. The count changes float sums, so every run of a study uses the same")
    p.add_argument("--compile", action="store_true",
                   help="train every run of the study through torch.compile(model, fullgraph=True) "
                        "(train.compile=true; evaluations stay eager). Each run pays its compile up front, "
                        "at its first step: measured 15-35 s per model on a 2-core VM (Intel Xeon) the first "
                        "time a shape is compiled, 1-6 s once torch's on-disk cache holds it; compiled steps "
                        "were 1.0-1.5x faster there (routemem bench train). results.json records compile; the "
                        "run cache keys on it (compiled and eager runs never stand in for each other). "
                        "ocl-baselines and rwf train ViT learners it does not reach (results.json says so)")
    p.add_argument("--shard", metavar="I/N", help="train only runs I, I+N, I+2N, ... (0 <= I < N) into "
                   "OUT/<study>/runs/ and stop; a last run without --shard writes the report")
    p.add_argument("--force", action="store_true", help="all only: run every study again, none reused; "
                   "deletes each study's run cache (OUT/<study>/runs/, the ocl-baselines backbone too) first")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("pretrain-vit", help="pretrain a small ViT on a source's pretraining classes; "
                       "writes FILE.safetensors and FILE.json",
                       description="Train a ViT from scratch to classify the pretraining classes of an image "
                                   "source (the half of its classes that streams never use), so that a backbone "
                                   "exists without downloads. Writes the weights in the common ViT safetensors "
                                   "layout and a JSON sidecar (config, validation accuracy, data hash, machine).")
    p.add_argument("--source", default="glyphs", help="glyphs (default), digits or folder:PATH; the pretraining "
                   "half of its classes is used (see --all-classes)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="weights; FILE.json is written beside")
    # defaults None: the dataclasses' (PretrainSettings, ViTConfig) apply; the help names them
    # without importing torch here (a test holds the two equal)
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="images per step (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate; warmup 10%% of the steps, cosine to lr/100 "
                   "(default 0.001)")
    p.add_argument("--d-model", type=int, help="width; the FFN is 4x wide (default 192)")
    p.add_argument("--layers", type=int, help="blocks (default 6)")
    p.add_argument("--heads", type=int, help="attention heads (default 3)")
    p.add_argument("--patch", type=int, help="patch side in pixels (default 4)")
    p.add_argument("--image-size", type=int, help="image side in pixels (default 32)")
    p.add_argument("--samples-per-class", type=int, default=50, help="glyphs: rendered samples per class (default %(default)s)")
    p.add_argument("--max-classes", type=int, default=None, help="keep this many classes (a fixed choice)")
    p.add_argument("--all-classes", action="store_true", help="train on every class of the source, not only its "
                   "pretraining half (for a folder of pretraining data only)")
    p.add_argument("--color", default="gray", choices=["gray", "rgb"], help="folders: load as gray or RGB")
    p.add_argument("--val-share", type=float, help="share of each class held out for validation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation, the validation split and the batch "
                   "order (the glyph renders stay the same) (default %(default)s)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                   help="where to train (auto: cuda when torch sees a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or evaluation lines")
    p.set_defaults(func=cmd_pretrain_vit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"routemem: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"routemem: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("routemem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `t5g` command line (also `python -m t5g`): one sub-command per job.

    t5g import --input=SRC --output=T5G_DIR [--scan_layers=true] [--config=PRESET_OR_JSON]
    t5g adapt  --encoder=SRC --decoder=SRC --output=T5G_DIR [--cross_attention=auto|copy|random]
               [--seed=N] [--scan_layers=true] [--encoder_config=..] [--decoder_config=..]
    t5g export --checkpoint=T5G_DIR [--step=N] --output=HF_DIR [--dtype=float32|bfloat16]
               [--hf_sliding_window=released|match] [--verify_max_length=N] [--no-verify]
    t5g average --checkpoint=T5G_DIR --last=N --output=T5G_DIR
    t5g score  --checkpoint=T5G_DIR [--step=N] --input=IN.jsonl --output=OUT.jsonl
               [--vocabulary=tokenizer.model] [--batch_size=8]
               (T5Gemma, Gemma 2: target log-likelihoods; a classifier: class log-probs)
    t5g train  --gin_file=F [--gin_file=F2 ...] [--gin.NAME=VALUE ...] [--gin_bindings="..."]
               [--coordinator_address=H:P --num_processes=N --process_id=I | --distributed]
    t5g generate   --checkpoint=T5G_DIR --input=IN.jsonl --output=OUT.jsonl [...]
    t5g eval       --gin_file=F [--gin.NAME=VALUE ...] [the distributed flags of train]
    t5g precompile --gin_file=F --topology=v5p:4x4x4 [--gin.NAME=VALUE ...]

The last three live beside the code they run (`EXTERNAL_COMMANDS`); each of those modules has
`HELP`, `add_arguments(parser)` and `run(args)`, and imports its heavy dependencies in `run`.

SRC is a Hugging Face folder, a t5g checkpoint directory or a Google Flax/Orbax checkpoint
(FLAT or NESTED), detected from its files. `import`, `export` and `score` handle Gemma 2,
T5Gemma and the encoder-only classifier (in HF: an encoder-only
T5GemmaForSequenceClassification; Google checkpoints hold no classifiers). Errors in the input
(a path, a key, a shape: `t5g.errors.is_input_error`) end the command with a one-line message and
exit status 2; nothing is left half-written. Any other exception is a bug in t5g: its traceback,
a line saying so, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback

from t5g import __version__
from t5g.errors import is_input_error

# Sub-commands defined beside the code they run: name -> module.
EXTERNAL_COMMANDS = {
    "generate": "t5g.inference.generate_cli",
    "eval": "t5g.evaluation.eval_cli",
    "precompile": "t5g.train.precompile",
}
# Sub-commands that read gin files and accept --gin.NAME=VALUE flags.
GIN_COMMANDS = ("train", "eval", "precompile")


def _bool(value: str) -> bool:
  if value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _config(value: str | None):
  from t5g.compat import convert
  return None if value is None else convert.config_from_arg(value)


def _cmd_import(args) -> None:
  from t5g.compat import convert
  kind = convert.import_checkpoint(args.input, args.output, scan_layers=args.scan_layers,
                                   config=_config(args.config))
  print(f"imported {kind} checkpoint {args.input} -> {args.output} (step 0)")


def _cmd_adapt(args) -> None:
  from t5g.compat import convert
  adapted = convert.adapt_checkpoint(
      args.encoder, args.decoder, args.output, cross_attention=args.cross_attention,
      seed=args.seed, scan_layers=args.scan_layers,
      encoder_config=_config(args.encoder_config), decoder_config=_config(args.decoder_config))
  new = adapted.new_parameters()
  print(f"adapted encoder={args.encoder} decoder={args.decoder} -> {args.output} (step 0); "
        f"cross-attention: {adapted.cross_attention}"
        + (f"; new parameters to warm up: {', '.join(new)}" if new else ""))


def _cmd_export(args) -> None:
  from t5g.compat import convert
  export = convert.export_checkpoint(args.checkpoint, args.output, step=args.step,
                                     dtype=args.dtype, verify=args.verify,
                                     hf_sliding_window=args.hf_sliding_window,
                                     verify_max_length=args.verify_max_length)
  print(f"exported {args.checkpoint} -> {args.output} ({args.dtype})")
  for line in export.lines():
    print(line)
  if export.verification is None and args.verify:
    print("not verified: transformers/torch are not installed")


def _cmd_average(args) -> None:
  from t5g.checkpoints import average
  steps = average.average(args.checkpoint, args.last, args.output)
  print(f"averaged the params of steps {steps} of {args.checkpoint} -> {args.output}")


def _cmd_score(args) -> None:
  from t5g.inference import scoring
  from t5g.runtime.atomic_file import atomic_write
  from t5g.checkpoints import model_dir
  config, _, step = model_dir.read_model(args.checkpoint, args.step)
  vocabulary = scoring.text_vocabulary(args.checkpoint, step, args.vocabulary, config)
  examples = scoring.read_examples(args.input, vocabulary and vocabulary.tokenizer.encode, config)
  loaded = model_dir.load(args.checkpoint, step)
  with atomic_write(args.output) as f:
    for record in scoring.score(loaded.params, loaded.config, examples, args.batch_size,
                                loaded.scanned):
      f.write(json.dumps(record) + "\n")
  print(f"scored {len(examples)} examples -> {args.output}")


def register_configurables() -> None:
  """Imports every module that defines a gin configurable a run file may bind (the trainer,
  `t5g.evaluate` and `t5g.EvalConfig`); each registers its own at import."""
  from t5g.evaluation import evaluate  # noqa: F401
  from t5g.train import trainer  # noqa: F401


def _cmd_train(args) -> None:
  from t5g.runtime import distributed, gin_files
  from t5g.train import trainer
  distributed.initialize_from_args(args)
  gin_files.parse(args.gin_file, gin_files.flag_bindings(args.gin_flags, args.gin_bindings))
  metrics = trainer.train()
  if metrics:
    print(f"finished at step {metrics['step']}: loss {metrics['loss']:.4f}")


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with all sub-commands."""
  from t5g.runtime import distributed  # Its flags; JAX is imported only when it initialises.
  parser = argparse.ArgumentParser(prog="t5g", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("import", help="HF, Google or t5g checkpoint -> t5g checkpoint dir")
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--scan_layers", type=_bool, default=True)
  p.add_argument("--config", help="preset name or config JSON (Google checkpoints whose "
                 "sizes match no preset)")
  p.set_defaults(fn=_cmd_import)

  p = sub.add_parser("adapt", help="two Gemma 2 checkpoints -> T5Gemma t5g checkpoint (step 0)")
  p.add_argument("--encoder", required=True)
  p.add_argument("--decoder", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--cross_attention", choices=("auto", "copy", "random"), default="auto",
                 help="auto: copy self-attention when the stacks are equal, else random")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--scan_layers", type=_bool, default=True)
  p.add_argument("--encoder_config")
  p.add_argument("--decoder_config")
  p.set_defaults(fn=_cmd_adapt)

  p = sub.add_parser("export", help="t5g checkpoint step -> HF folder")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--step", type=int)
  p.add_argument("--output", required=True)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--hf_sliding_window", choices=("released", "match"), default="released",
                 help="released: sliding_window = W, as Google's folders; match: the value with "
                      "which the installed transformers computes t5g's window")
  p.add_argument("--verify_max_length", type=int,
                 help="longest row the verification compares (default 512: past the tiny "
                      "presets' windows; 4098 checks past a 4096 window, minutes of CPU)")
  p.add_argument("--no-verify", "--no_verify", dest="verify", action="store_false")
  p.set_defaults(fn=_cmd_export)

  p = sub.add_parser("average", help="average the params of the last N steps (new t5g dir)")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--last", type=int, default=5)
  p.add_argument("--output", required=True)
  p.set_defaults(fn=_cmd_average)

  p = sub.add_parser("score", help="teacher-forced target log-probs (a classifier: class "
                     "log-probs) for a jsonl file")
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--step", type=int)
  p.add_argument("--input", required=True)
  p.add_argument("--output", required=True)
  p.add_argument("--vocabulary", help="SentencePiece model, for text inputs/targets (default: "
                 "the one the checkpoint records; a classifier: EOS is appended to inputs)")
  p.add_argument("--batch_size", type=int, default=8)
  p.set_defaults(fn=_cmd_score)

  p = sub.add_parser("train", help="train with gin configs (see gin/README.md)")
  p.add_argument("--gin_file", action="append", default=[], required=True)
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="a whole gin line, e.g. \"TRAIN_STEPS = 100\"")
  distributed.add_arguments(p)
  p.set_defaults(fn=_cmd_train, gin_flags=[])

  for name, module_name in EXTERNAL_COMMANDS.items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=module.HELP)
    module.add_arguments(p)
    p.set_defaults(fn=module.run, gin_flags=[])

  from t5g.runtime import gin_files
  for name in GIN_COMMANDS:
    sub.choices[name].epilog = gin_files.FLAGS_HELP
    sub.choices[name].formatter_class = argparse.RawDescriptionHelpFormatter
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `t5g` console script (and of `python -m t5g`), which pass no `argv`."""
  if argv is None:  # t5g is the program: the console is t5g's.
    from t5g.runtime import console
    console.quiet()
  argv = sys.argv[1:] if argv is None else list(argv)
  gin_flags = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
  args = build_parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  if gin_flags and args.command not in GIN_COMMANDS:
    print(f"t5g {args.command}: error: --gin.* flags are for `t5g {'/'.join(GIN_COMMANDS)}`",
          file=sys.stderr)
    return 2
  args.gin_flags = gin_flags
  try:
    if args.command in GIN_COMMANDS:
      register_configurables()
    args.fn(args)
  except FloatingPointError as e:  # A diverged run: its last good checkpoint is kept.
    print(f"t5g {args.command}: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"t5g {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if not is_input_error(e):
      traceback.print_exc()
      print(f"t5g {args.command}: internal error: this is a bug in t5g {__version__}, not in "
            "your input; please report it with the traceback above", file=sys.stderr)
      return 1
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"t5g {args.command}: error: {message}", file=sys.stderr)
    return 2
  return 0

"""`t5g generate`: decode a jsonl file of inputs with a t5g checkpoint.

    t5g generate --checkpoint=DIR [--step=N] --input=IN.jsonl --output=OUT.jsonl
        [--max_new_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1] [--beam_size=1]
        [--length_penalty=1] [--seed=0] [--vocabulary=tokenizer.model] [--batch_size=8]
        [--max_input_length=N] [--on_long_input=error|truncate]

Each input line is a JSON object whose `inputs` are token ids (a list of ints) or text, encoded
without BOS/EOS, as `t5g score` does, by the SentencePiece model that --vocabulary names, else
by the one the checkpoint records (`t5g.inference.scoring.text_vocabulary`; a vocabulary whose
size is not the model's vocab_size is refused before anything is decoded).
Blank lines are skipped. T5Gemma: the encoder reads `inputs` and the decoder starts from BOS;
Gemma 2: `inputs` is the prompt after BOS. Decoding: t5g/inference/decoding.py (greedy at
temperature 0, else sampling with --seed; beam search with --beam_size > 1).

The parameters are loaded in the unscanned layout (converted on the host when saved scanned),
which decodes faster. Output: every input record, in order, with `generated_ids` (the new
tokens, up to and including EOS when one was produced) and, with a vocabulary (given or
recorded), `generated_text` (those ids decoded, EOS left out). The file is written under a
temporary name and renamed when complete, so a failed run leaves no partial output.

Bad input fails before anything is decoded, with a ValueError naming the file and line (the
`t5g` command prints it on one line and exits 2): a line that is not a JSON object; `inputs`
missing, neither text nor a list of ints, or text without a vocabulary; empty `inputs`; a token
id that is 0 (padding) or not below the vocabulary size. An input longer than
--max_input_length fails with --on_long_input=error (the default); with truncate it is cut
with a logged warning: T5Gemma keeps its first tokens, Gemma 2 the last ones of its prompt
(those the continuation follows).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from t5g.errors import InputError

HELP = "decode jsonl inputs with a t5g checkpoint (greedy, sampling, beam search)"
BUCKET = 32  # Input lengths are padded up to a multiple of this, to bound recompilation.


def add_arguments(parser) -> None:
  """Adds this sub-command's flags."""
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--step", type=int)
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0: off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
  parser.add_argument("--beam_size", type=int, default=1)
  parser.add_argument("--length_penalty", type=float, default=1.0,
                      help="beam score = log-prob / length ** length_penalty (transformers')")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocabulary", help="SentencePiece model, for text inputs and outputs "
                      "(default: the one the checkpoint records)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_input_length", type=int)
  parser.add_argument("--on_long_input", choices=("error", "truncate"), default="error")


def read_inputs(path: str, encode: Callable[[str], list[int]] | None, vocab_size: int,
                max_length: int | None, keep_end: bool, on_long: str = "error"
                ) -> list[tuple[dict[str, Any], list[int]]]:
  """(record, input ids) per non-blank line; errors name the file and line (module docstring).

  keep_end: truncation keeps the last max_length tokens (else the first).
  """
  examples = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except ValueError:
        raise InputError(f"{where}: not valid JSON") from None
      value = record.get("inputs") if isinstance(record, dict) else None
      if isinstance(value, str):
        if encode is None:
          raise InputError(f"{where}: 'inputs' is text; pass --vocabulary (the checkpoint "
                           "records no vocabulary)")
        ids = list(encode(value))
      elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value):
        ids = value
      else:
        raise InputError(f"{where}: 'inputs' must be a list of token ids or text")
      if not ids:
        raise InputError(f"{where}: 'inputs' is empty")
      bad = [t for t in ids if not 0 < t < vocab_size]
      if bad:
        raise InputError(f"{where}: token id {bad[0]} is padding (0) or outside the "
                         f"vocabulary of {vocab_size}")
      if max_length is not None and len(ids) > max_length:
        if on_long == "error":
          raise InputError(f"{where}: {len(ids)} input tokens > --max_input_length={max_length} "
                           "(--on_long_input=truncate cuts it)")
        logging.warning("%s: %d input tokens truncated to %d", where, len(ids), max_length)
        ids = ids[-max_length:] if keep_end else ids[:max_length]
      examples.append((record, ids))
  if not examples:
    raise InputError(f"{path}: no inputs")
  return examples


def run(args) -> None:
  """Runs the sub-command."""
  import jax
  import numpy as np

  from t5g.runtime.atomic_file import atomic_write
  from t5g.checkpoints import model_dir
  from t5g.inference.decoding import DecodeConfig, generate
  from t5g.inference.scoring import text_vocabulary
  from t5g.model.config import EncoderDecoderConfig

  decode = DecodeConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.beam_size, args.length_penalty)
  if args.batch_size < 1 or (args.max_input_length is not None and args.max_input_length < 1):
    raise InputError("--batch_size and --max_input_length must be >= 1")
  config, _, step = model_dir.read_model(args.checkpoint, args.step)
  vocabulary = text_vocabulary(args.checkpoint, step, args.vocabulary, config)
  processor = vocabulary.tokenizer if vocabulary is not None else None
  encoder_decoder = isinstance(config, EncoderDecoderConfig)
  examples = read_inputs(args.input, processor.encode if processor else None, config.vocab_size,
                         args.max_input_length, keep_end=not encoder_decoder,
                         on_long=args.on_long_input)
  loaded = model_dir.load(args.checkpoint, step, scanned=False)  # Faster (decoding.py).
  rng = jax.random.PRNGKey(args.seed)
  with atomic_write(args.output) as f:
    for start in range(0, len(examples), args.batch_size):
      batch = examples[start:start + args.batch_size]
      longest = max(len(ids) for _, ids in batch)
      inputs = np.zeros((args.batch_size, -(-longest // BUCKET) * BUCKET), np.int32)
      for row, (_, ids) in enumerate(batch):  # Rows past the batch stay empty (dropped).
        inputs[row, :len(ids)] = ids
      out = generate(loaded.config, loaded.params, inputs, decode,
                     rng=jax.random.fold_in(rng, start), scanned=loaded.scanned)
      for (record, _), tokens, length in zip(batch, out.tokens, out.lengths):
        ids = tokens[:length].tolist()
        result = {**record, "generated_ids": ids}
        if processor is not None:
          result["generated_text"] = processor.decode([t for t in ids if t != decode.eos_id])
        f.write(json.dumps(result) + "\n")
  print(f"generated for {len(examples)} inputs -> {args.output}")

"""Evaluation metric functions for seqio tasks, and the named ones a user's task can ask for.

seqio calls a metric with (targets, predictions) when it takes `predictions` (a predict metric:
the model decodes, the task's postprocessor turns the text into a prediction) and with
(targets, scores) when it takes `scores` (a score metric: each example's teacher-forced target
log-likelihood, or its label's log-probability for a classifier). Values are in percent except
`log_likelihood`.

`NAMED` lists the metrics that user-registered tasks select by name (`metrics=(...)`);
`by_name` raises a ValueError naming an unknown one and the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from t5g.errors import InputError


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """Percentage of predictions equal to their target (class indices or texts)."""
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predicted texts equal to their target after stripping outer whitespace."""
  return {"exact_match": 100.0 * float(np.mean([str(t).strip() == str(p).strip()
                                                for t, p in zip(targets, predictions)]))}


def log_likelihood(targets: Sequence, scores: Sequence[float]) -> dict[str, float]:
  """Mean over examples of the target's log-likelihood (a score metric)."""
  del targets
  return {"log_likelihood": float(np.mean(scores))}


def _f1(targets: np.ndarray, predictions: np.ndarray, positive: int) -> float:
  true_positives = np.sum((predictions == positive) & (targets == positive))
  denominator = np.sum(predictions == positive) + np.sum(targets == positive)
  return 0.0 if denominator == 0 else 2.0 * true_positives / denominator


def macro_f1(targets: Sequence[int], predictions: Sequence[int],
             num_classes: int) -> dict[str, float]:
  """Unweighted mean over classes 0..num_classes-1 of each class's F1, in percent."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  scores = [_f1(targets, predictions, label) for label in range(num_classes)]
  return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}


def multirc_metrics(targets: Sequence[dict], predictions: Sequence[int]) -> dict[str, float]:
  """MultiRC: accuracy over all answers, F1 of the `True` class over all answers (`f1a`), and
  exact match per question (every answer of the question right)."""
  labels = np.array([target["value"] for target in targets])
  predictions = np.asarray(predictions)
  correct_by_question: dict[tuple[int, int], bool] = {}
  for target, label, prediction in zip(targets, labels, predictions):
    question = target["group"]
    correct_by_question[question] = correct_by_question.get(question, True) and (
        label == prediction)
  return {"accuracy": 100.0 * float(np.mean(labels == predictions)),
          "f1a": 100.0 * _f1(labels, predictions, positive=1),
          "exact_match": 100.0 * float(np.mean(list(correct_by_question.values())))}


NAMED: dict[str, Callable] = {"accuracy": accuracy, "exact_match": exact_match,
                              "log_likelihood": log_likelihood}


def by_name(names: Sequence[str]) -> list[Callable]:
  """The metric functions called `names` in `NAMED`; an unknown name raises a ValueError."""
  if isinstance(names, str):
    names = [names]
  unknown = [name for name in names if name not in NAMED]
  if unknown:
    raise InputError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(sorted(NAMED))}")
  return [NAMED[name] for name in names]

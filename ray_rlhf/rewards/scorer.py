"""The reward actor's class: Python reward functions and/or an HF reward model, summed with weights.

``RewardScorer`` is a plain class; the driver applies ``ray.remote`` at launch. For one rollout

    reward = sum_k w_k * f_k(prompt, response)  +  w_model * RM(prompt + response)

and ``reward_parts`` keeps every unweighted term, keyed by its ``module:function`` spec or
``"model"``. Everything the user gave is checked in the constructor, before the reward model is
loaded: each spec is imported and must name a callable taking ``(prompt, response)``; the model
directory must hold a sequence-classification model with ``num_labels=1``. :func:`check_sources`
runs the same checks without loading any weights, for the driver's preflight.

A reward function that raises, or returns NaN, an infinity or a non-number, fails the whole
:meth:`RewardScorer.score` call with a :class:`RewardError` naming the function and the sample:
the learner never sees a partly scored batch.

The reward model reads ``prompt + response`` (the response continues the prompt), tokenized by
the model's own tokenizer with right padding (so positions match the unpadded sequence and the
model pools the last real token) and left truncation to its context (the end of the response is
kept). It runs in eval mode under ``torch.inference_mode`` and its score is the scalar logit.
"""

from __future__ import annotations

import importlib
import inspect
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ray_rlhf.errors import UserError
from ray_rlhf.records import RolloutBatch, RolloutSummary

MODEL_KEY = "model"
"""Key of the reward model's score in :attr:`RolloutBatch.reward_parts`."""

_FIX_IMPORT = "check reward.functions and that the module is importable (PYTHONPATH / --working-dir)"


class RewardError(UserError):
    """A reward source failed on a sample, or returned something other than a finite number."""

    def __init__(self, message: str, source: str = "", prompt_index: int | None = None,
                 sample_index: int | None = None):
        super().__init__(message)
        self.source = source
        """The failing ``module:function`` spec, or ``"model"``."""
        self.prompt_index = prompt_index
        self.sample_index = sample_index


RewardFn = Callable[[str, str], Any]


def resolve_function(spec: str) -> RewardFn:
    """Import ``module:function`` (``function`` may be dotted, e.g. ``Class.method``).

    Raises :class:`UserError` naming the spec for a malformed spec, a missing module, a module
    that fails to import, a missing attribute, a non-callable, or a callable that cannot take
    ``(prompt, response)``.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UserError(f"reward function spec {spec!r} is malformed; write it as 'module:function', "
                        "e.g. 'ray_rlhf.rewards.rules:letter_frequency'")
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserError(f"reward function {spec!r}: module {exc.name!r} not found; {_FIX_IMPORT}") from exc
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} failed: {exc}; "
                        "install the missing package in the runtime environment") from exc
    except Exception as exc:  # a user module's own bug: SyntaxError, NameError at import time, ...
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} raised "
                        f"{type(exc).__name__}: {exc}; fix the module") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}; "
                            "check the function name in reward.functions")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward function {spec!r} is a {type(obj).__name__}, not a function; "
                        "point reward.functions at a function fn(prompt, response) -> float")
    try:
        inspect.signature(obj).bind("prompt", "response")
    except TypeError as exc:
        raise UserError(f"reward function {spec!r} cannot be called as fn(prompt, response) ({exc}); "
                        "give it the signature fn(prompt: str, response: str) -> float") from exc
    except ValueError:  # some builtins have no introspectable signature; the first call will tell
        pass
    return obj


def check_reward_model(path: str | Path) -> Any:
    """Check, without loading weights, that ``path`` holds a sequence-classification model with
    ``num_labels=1``; returns its ``transformers`` config. Raises :class:`UserError` otherwise."""
    p = Path(path)
    fix = "set reward.model_path to a Hugging Face sequence-classification model directory, or leave it empty"
    if not p.exists():
        raise UserError(f"reward model path '{p}' does not exist; {fix}")
    if not (p / "config.json").is_file():
        raise UserError(f"reward model path '{p}' holds no config.json (not a model saved with save_pretrained); {fix}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception as exc:
        raise UserError(f"reward model '{p}': cannot read config.json ({type(exc).__name__}: {exc}); {fix}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"reward model '{p}' is {'/'.join(archs) or 'of unknown architecture'}, not a "
                        f"*ForSequenceClassification model; {fix}")
    if config.num_labels != 1:
        raise UserError(f"reward model '{p}' has num_labels={config.num_labels}; a reward model must output one "
                        "scalar (num_labels=1)")
    return config


def check_sources(functions: list[tuple[str, float]], model_path: str | None = None,
                  model_weight: float = 1.0) -> list[tuple[str, float, RewardFn]]:
    """Every cheap check of the reward configuration (imports functions, reads the model config).

    Returns ``(spec, weight, fn)`` per function. Raises :class:`UserError` on the first problem.
    """
    resolved: list[tuple[str, float, RewardFn]] = []
    seen: set[str] = set()
    for spec, weight in functions:
        fn = resolve_function(spec)
        if spec in seen:
            raise UserError(f"reward function {spec!r} is listed twice in reward.functions; list it once "
                            "with the summed weight")
        seen.add(spec)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"reward function {spec!r} has weight {weight!r}; give a finite number")
        resolved.append((spec, float(weight), fn))
    if model_path:
        check_reward_model(model_path)
        if not isinstance(model_weight, (int, float)) or not math.isfinite(model_weight):
            raise UserError(f"reward.model_weight is {model_weight!r}; give a finite number")
    if not resolved and not model_path:
        raise UserError("no reward source: set reward.functions (e.g. ray_rlhf.rewards.rules:letter_frequency) "
                        "and/or reward.model_path")
    return resolved


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text[:n]) + ("..." if len(text) > n else "")


def _as_finite_float(value: Any) -> float | None:
    """``float(value)`` for a real number (Python, NumPy or 1-element tensor); None if not one."""
    if isinstance(value, (str, bytes, complex)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if math.isfinite(out) else None


class RewardScorer:
    """Scores rollouts with weighted Python functions and an optional HF reward model.

    Args:
        functions: ``("module:function", weight)`` pairs; each function is ``fn(prompt, response)
            -> float``.
        model_path: directory of a ``*ForSequenceClassification`` model with ``num_labels=1``
            and its tokenizer, or None for no model.
        model_weight: weight of the model's score in the sum.
        batch_size: sequences per reward-model forward pass.
        device: torch device of the reward model.
        torch_threads: ``torch.set_num_threads`` for this process (None: leave it).
    """

    def __init__(self, functions: list[tuple[str, float]], model_path: str | None = None,
                 model_weight: float = 1.0, batch_size: int = 32, device: str = "cpu",
                 torch_threads: int | None = None):
        if batch_size <= 0:
            raise UserError(f"reward.batch_size is {batch_size}; give a positive integer")
        # Cheap checks first: no weights are loaded until every source is known to be usable.
        self.functions = check_sources(functions, model_path, model_weight)
        self.model_path = str(model_path) if model_path else None
        self.model_weight = float(model_weight)
        self.batch_size = batch_size
        self.device = device
        self.model = self.tokenizer = None
        self.max_length: int | None = None
        self._scored = 0
        self._seconds: dict[str, float] = {"functions": 0.0, "model": 0.0}
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        if self.model_path:
            self._load_model(self.model_path)

    # -- public API ---------------------------------------------------------------------------

    def score(self, *batches: RolloutBatch) -> tuple[RolloutBatch, RolloutSummary]:
        """The batches concatenated and scored (``reward`` and ``reward_parts`` filled), and the
        small summary the driver logs. Run it with Ray's ``num_returns=2`` and hand it the
        generators' ObjectRefs: the learner then takes the first result by reference.

        Raises :class:`RewardError` if any source fails on any sample; nothing is returned then.
        """
        batch = RolloutBatch.concat(batches)
        keys = batch.keys()
        where = [f"prompt {p} sample {j}" for p, j in keys]
        parts = self._score_texts(batch.prompt, batch.response, where, keys)
        self._scored += len(batch)
        names = [spec for spec, _, _ in self.functions] + ([MODEL_KEY] if self.model_path else [])
        columns = {name: np.array([p[name] for p in parts], dtype=np.float64) for name in names}
        scored = batch.with_rewards(np.array([self._total(p) for p in parts], dtype=np.float64), columns)
        return scored, RolloutSummary.of(scored)

    def validate(self, prompt: str = "Tell me a story.", response: str = " Once there was a tree.") -> dict[str, float]:
        """Score one synthetic sample through every source; returns its ``reward_parts``.

        Lets the driver surface a reward function that fails on ordinary text before the first
        rollout is generated. Raises :class:`RewardError` naming the source.
        """
        return self._score_texts([prompt], [response], ["the validation sample"], [(None, None)])[0]

    def ping(self) -> bool:
        """Liveness check for the driver."""
        return True

    def info(self) -> dict[str, Any]:
        """Sources, counts, time spent and memory, for benchmarks."""
        import psutil

        rss_mb = psutil.Process().memory_info().rss / 2**20
        return {
            "functions": [(spec, w) for spec, w, _ in self.functions],
            "model_path": self.model_path,
            "model_weight": self.model_weight if self.model_path else None,
            "model_params": sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0,
            "scored": self._scored,
            "functions_seconds": self._seconds["functions"],
            "model_seconds": self._seconds["model"],
            "rss_mb": rss_mb,
            # Linux reports ru_maxrss in KiB; it trails the current RSS by a few pages at times.
            "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mb),
        }

    # -- internals ----------------------------------------------------------------------------

    def _total(self, parts: dict[str, float]) -> float:
        total = sum(w * parts[spec] for spec, w, _ in self.functions)
        if self.model_path:
            total += self.model_weight * parts[MODEL_KEY]
        return float(total)

    def _score_texts(self, prompts: list[str], responses: list[str], where: list[str],
                     keys: list[tuple[int | None, int | None]]) -> list[dict[str, float]]:
        parts: list[dict[str, float]] = [{} for _ in prompts]
        t0 = time.perf_counter()
        for spec, _, fn in self.functions:
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                try:
                    raw = fn(prompt, response)
                except Exception as exc:
                    raise RewardError(
                        f"reward function {spec!r} raised {type(exc).__name__}: {exc} on {where[i]} "
                        f"(response {_excerpt(response)}); fix the function", spec, *keys[i]) from exc
                value = _as_finite_float(raw)
                if value is None:
                    raise RewardError(
                        f"reward function {spec!r} returned {_excerpt(repr(raw), 30)} ({type(raw).__name__}) on "
                        f"{where[i]} (response {_excerpt(response)}); it must return a finite float",
                        spec, *keys[i])
                parts[i][spec] = value
        t1 = time.perf_counter()
        self._seconds["functions"] += t1 - t0
        if self.model is not None:
            texts = [p + r for p, r in zip(prompts, responses)]
            for i, value in enumerate(self._model_scores(texts)):
                if not math.isfinite(value):
                    raise RewardError(
                        f"reward model '{self.model_path}' returned {value} on {where[i]} (response "
                        f"{_excerpt(responses[i])}); check the model's weights", MODEL_KEY, *keys[i])
                parts[i][MODEL_KEY] = value
            self._seconds["model"] += time.perf_counter() - t1
        return parts

    def _load_model(self, path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise UserError(f"reward model '{path}': cannot load its tokenizer ({type(exc).__name__}: {exc}); "
                            "save the tokenizer into the model directory (tokenizer.save_pretrained)") from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"reward model '{path}': its tokenizer has neither a pad nor an EOS token; "
                                "set tokenizer.pad_token and save it again")
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding keeps each sequence's positions as if unpadded; the model pools the
        # rightmost non-pad token. Left truncation keeps the end of the response.
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:
            raise UserError(f"reward model '{path}': cannot load weights ({type(exc).__name__}: {exc}); "
                            "point reward.model_path at a complete save_pretrained directory") from exc
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False).to(self.device)
        limits = [n for n in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        self.model, self.tokenizer = model, tokenizer

    def _model_scores(self, texts: list[str]) -> list[float]:
        """Scalar logit per text, ``batch_size`` texts per forward pass."""
        import torch

        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length)
            with torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out

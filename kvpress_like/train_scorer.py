"""Fit a learned scorer (KVzap, arXiv 2601.07891) for any model: collect a teacher's scores, fit, write the artifact.

1. **Collect.** Each training document (:mod:`kvpress_like.train_corpus`) is prefilled once by the teacher, any
   registered method with a scorer (``kvzip``, ``dapq``, …). A recorder around the teacher's scorer keeps, in
   every scored layer, the attention inputs of ``tokens_per_doc`` seeded context rows and the teacher's scores of
   those rows per KV head (the log, floored at ``floor``, by default). Each document is one file in
   ``OUT/collect/``, written atomically, so a collection that stops resumes where it stopped.
2. **Fit.** Per layer, on every document but the last ``held_out``: Ridge regression in closed form (centred,
   ``alpha`` × identity added to XᵀX), or a two-layer GELU MLP trained with AdamW (KVzap's recipe: lr 5e-3,
   cosine schedule, batch 512, gradient clipping 1.0; seeded, so reproducible).
3. **Check.** On the held-out documents: R² per layer (all heads pooled) and the Spearman rank correlation
   between prediction and teacher within each document and head (their mean): top-k works within a document.

The artifact (:mod:`kvpress_like.surrogate`) records the model's per-layer fingerprints, the teacher's resolved
configuration, the data (corpus, sizes, seeds), the settings, the metrics and the time each stage took.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpress_like.errors import ConfigError
from kvpress_like.parts import LayerContext, Scorer
from kvpress_like.plugins import get_adapter
from kvpress_like.surrogate import Surrogate, module_fingerprint, save_surrogate

COLLECT_DIR = "collect"
MANIFEST = "manifest.json"


class TrainingSettings(BaseModel):
    """Everything that decides the artifact's weights (stored in it, and checked when a collection resumes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "mlp"] = "linear"
    docs: int = Field(96, ge=2, description="training documents, held-out ones included")
    held_out: int = Field(8, ge=1, description="the last documents, kept for the metrics")
    context_tokens: int = Field(1000, ge=16, description="tokens of prose per document")
    tokens_per_doc: int = Field(256, ge=1, description="seeded context rows sampled per document and layer")
    seed: int = Field(0, ge=0, description="row sampling and MLP initialisation")
    target: Literal["log", "raw"] = Field("log", description="fit log(max(score, floor)) or the score itself")
    floor: float = Field(1e-12, gt=0, description="smallest score before the log")
    alpha: float = Field(1.0, ge=0, description="Ridge penalty (linear)")
    width: int = Field(64, ge=1, description="hidden units of the MLP")
    epochs: int = Field(15, ge=1, description="MLP epochs")
    lr: float = Field(5e-3, gt=0, description="MLP learning rate (AdamW)")
    batch_size: int = Field(512, ge=1, description="MLP batch size")

    def check(self) -> None:
        if self.held_out >= self.docs:
            raise ConfigError(f"held_out ({self.held_out}) must be below docs ({self.docs}): some documents must train")


@dataclass
class Prompt:
    """One training document as the teacher reads it: ids ``[1, L]`` and the context rows ``[first, end)``."""

    index: int
    input_ids: torch.Tensor
    first: int
    end: int


class ScoreRecorder(Scorer):
    """The teacher's scorer, unchanged, keeping each scored layer's attention inputs and scores of chosen rows."""

    name = "recorder"
    reads_hidden_states = True

    def __init__(self, inner: Scorer):
        super().__init__(inner.config)
        self.inner, self.rows = inner, torch.empty(0, dtype=torch.long)
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.inner.score(ctx)
        if ctx.hidden_states is None:
            raise ConfigError(f"the teacher's prefill gave layer {ctx.layer_idx} no hidden states to record")
        hidden = ctx.hidden_states[0, self.rows].to(torch.float16)
        self.records[ctx.layer_idx] = (hidden, scores.real[0, :, self.rows].T.float().clone())
        return scores


def teacher_pipeline(name: str, tokenizer, overrides: dict[str, Any] | None = None):
    """The teacher ``name`` (any registered method with a scorer), with a budget that makes every layer score.

    KVzip's ``reconstruct`` window gets the tokenizer's repeat instruction (:func:`kvzip_window`) unless given
    (without a tokenizer, the prompt is repeated with no instruction).
    """
    from kvpress_like.factory import build, needs_budget
    from kvpress_like.methods.kvzip import kvzip_window
    from kvpress_like.plugins import get_registry

    overrides = dict(overrides or {})
    spec = get_registry().method(name)
    if tokenizer is not None and spec.window.name == "reconstruct" and "instruction_ids" not in spec.window.options:
        window = overrides.get("window", {})
        if isinstance(window, dict) and "instruction_ids" not in window:
            overrides["window"] = {**kvzip_window(tokenizer), **window}
    budget = 0.5 if needs_budget(name, **overrides) else None
    return build(name, budget=budget, **overrides)


def training_prompts(tokenizer, settings: TrainingSettings) -> Iterable[Prompt]:
    """The training documents as query-agnostic prompts (the context alone in the chat template)."""
    from kvpress_like.prompting import build_prompt
    from kvpress_like.train_corpus import training_document

    head = build_prompt(tokenizer, "").context_length
    for index in range(settings.docs):
        prompt = build_prompt(tokenizer, training_document(tokenizer, index, settings.context_tokens))
        yield Prompt(index, prompt.input_ids, head, prompt.context_length)


def collect(
    model, prompts: Iterable[Prompt], teacher, folder: Path, settings: TrainingSettings, manifest: dict[str, Any],
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> None:
    """Run the teacher on every prompt not yet collected in ``folder`` and write one file per document."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _check_manifest(folder / MANIFEST, manifest)
    recorder = ScoreRecorder(teacher.scorer)
    original, teacher.scorer = teacher.scorer, recorder
    try:
        for prompt in progress(prompts):
            path = folder / f"doc-{prompt.index:05d}.safetensors"
            if path.exists():
                continue
            count = min(settings.tokens_per_doc, prompt.end - prompt.first)
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + prompt.index)
            chosen = torch.randperm(prompt.end - prompt.first, generator=generator)[:count]
            recorder.rows, recorder.records = (prompt.first + chosen).sort().values, {}
            with torch.no_grad():
                teacher.prefill(model, prompt.input_ids)
            if not recorder.records:
                raise ConfigError(f"the teacher {teacher.name!r} scored no layer of document {prompt.index}")
            tensors = {}
            for layer, (hidden, scores) in recorder.records.items():
                tensors[f"x.{layer}"] = hidden.contiguous()
                tensors[f"y.{layer}"] = _target(scores, settings).contiguous()
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)
    finally:
        teacher.scorer = original


def _target(scores: torch.Tensor, settings: TrainingSettings) -> torch.Tensor:
    if settings.target == "raw":
        return scores
    if bool((scores < 0).any()):
        raise ConfigError("the teacher's scores are negative: a log target needs non-negative scores (use target=raw)")
    return scores.clamp_min(settings.floor).log()


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != json.loads(json.dumps(manifest)):
            raise ConfigError(f"{path.parent} holds a collection made with other settings, teacher or model; "
                              "resume it with the same command, or give another --out")
    else:
        path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def load_collection(folder: Path, docs: int) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per document, ``{layer: (hidden [k, D] float32, target [k, kv_heads])}``."""
    from safetensors.torch import load_file

    documents = []
    for index in range(docs):
        path = folder / f"doc-{index:05d}.safetensors"
        if not path.exists():
            raise ConfigError(f"{path} is missing: run the collection to the end first")
        tensors = load_file(str(path))
        layers = sorted(int(key.split(".")[1]) for key in tensors if key.startswith("x."))
        documents.append({i: (tensors[f"x.{i}"].float(), tensors[f"y.{i}"].float()) for i in layers})
    return documents


def fit_linear(x: torch.Tensor, y: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Ridge regression ``y ≈ x W + b`` in closed form (float64): the intercept is not penalised."""
    x64, y64 = x.double(), y.double()
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    xc, yc = x64 - x_mean, y64 - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc)
    return {"weight": weight.float(), "bias": (y_mean - x_mean @ weight).float()}


def fit_mlp(x: torch.Tensor, y: torch.Tensor, settings: TrainingSettings) -> dict[str, torch.Tensor]:
    """A two-layer GELU MLP ``x → width → kv_heads`` (MSE, AdamW, cosine schedule, clipped gradients)."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], settings.width), torch.nn.GELU(),
                              torch.nn.Linear(settings.width, y.shape[1]))
    steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            optimiser.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x[batch]), y[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            schedule.step()
    first, last = net[0], net[2]
    return {"w1": first.weight.detach().T.contiguous(), "b1": first.bias.detach().clone(),
            "w2": last.weight.detach().T.contiguous(), "b2": last.bias.detach().clone()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks are not needed: ties are rare in floats)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12))


def held_out_metrics(surrogate: Surrogate, documents: list[dict], layer: int) -> dict[str, float]:
    """R² (heads pooled) and the mean within-document, within-head Spearman correlation on ``documents``."""
    predictions, targets, correlations = [], [], []
    for document in documents:
        x, y = document[layer]
        predicted = surrogate.predict(layer, x[None])[0].T  # [k, kv_heads]
        predictions.append(predicted)
        targets.append(y)
        correlations += [spearman(predicted[:, h], y[:, h]) for h in range(y.shape[1])]
    predicted, target = torch.cat(predictions), torch.cat(targets)
    residual = float(((predicted - target) ** 2).sum())
    total = float(((target - target.mean(0)) ** 2).sum())
    return {"r2": 1 - residual / total if total else float("nan"), "spearman": sum(correlations) / len(correlations)}


def fit(folder: Path, settings: TrainingSettings) -> tuple[Surrogate, dict[str, dict[str, float]]]:
    """Fit every layer on the training documents of a finished collection; metrics on the held-out ones."""
    documents = load_collection(folder, settings.docs)
    train, held = documents[: settings.docs - settings.held_out], documents[settings.docs - settings.held_out :]
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for layer in sorted(train[0]):
        x = torch.cat([d[layer][0] for d in train])
        y = torch.cat([d[layer][1] for d in train])
        layers[layer] = fit_linear(x, y, settings.alpha) if settings.kind == "linear" else fit_mlp(x, y, settings)
    surrogate = Surrogate(settings.kind, layers)
    metrics = {str(layer): held_out_metrics(surrogate, held, layer) for layer in layers}
    return surrogate, metrics


def model_identity(model, name: str, layers: Iterable[int]) -> dict[str, Any]:
    """The model an artifact is fitted on: its name, shape and every scored layer's attention fingerprint."""
    config = model.config
    modules = get_adapter(model).attention_modules()
    return {
        "name": name,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "layers": {str(i): module_fingerprint(modules[i]) for i in layers},
    }


def train_scorer(
    model, tokenizer, teacher, out: str | Path, settings: TrainingSettings, model_name: str,
    prompts: Iterable[Prompt] | None = None, data: dict[str, Any] | None = None,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> Surrogate:
    """Collect (resuming), fit and write the artifact into ``out``; returns the surrogate with its metadata.

    ``teacher`` is a :class:`~kvpress_like.pipeline.Pipeline` (:func:`teacher_pipeline` builds a registered one);
    its method's name is the artifact's teacher family (what ``artifact="shipped:<family>"`` looks for).
    ``prompts`` replaces the offline corpus (then ``data`` describes them), e.g. for a tiny model in tests.
    """
    from kvpress_like.provenance import provenance

    settings.check()
    out = Path(out)
    if prompts is None:
        from kvpress_like.train_corpus import TRAIN_SEED_BASE, corpus_info

        prompts = training_prompts(tokenizer, settings)
        info = corpus_info()
        data = {"corpus": info.source, "paragraphs": info.paragraphs, "characters": info.characters,
                "sha256": info.sha256, "seeds": [TRAIN_SEED_BASE, TRAIN_SEED_BASE + settings.docs - 1],
                "documents": "alternately real prose and prose with four generated facts (kvpress_like.train_corpus)"}
    layers = get_adapter(model).compressible_layers()
    identity = model_identity(model, model_name, layers)
    manifest = {"teacher": teacher.config, "settings": settings.model_dump(), "model": identity, "data": data}
    started = time.perf_counter()
    collect(model, prompts, teacher, out / COLLECT_DIR, settings, manifest, progress)
    collected = time.perf_counter()
    surrogate, metrics = fit(out / COLLECT_DIR, settings)
    fitted = time.perf_counter()
    rows = (settings.docs - settings.held_out) * settings.tokens_per_doc
    surrogate.meta = {
        "model": {**identity, "layers": {k: v for k, v in identity["layers"].items() if int(k) in surrogate.layers}},
        "teacher": {"family": teacher.name, "config": teacher.config, "target": settings.target,
                    "floor": settings.floor},
        "data": {**(data or {}), "documents_total": settings.docs, "held_out": settings.held_out,
                 "training_rows_per_layer_at_most": rows},
        "settings": settings.model_dump(),
        "metrics": metrics,
        "seconds": {"collect": round(collected - started, 1), "fit": round(fitted - collected, 1)},
        "provenance": provenance(),
    }
    save_surrogate(surrogate, out)
    surrogate.source = str(out)
    return surrogate

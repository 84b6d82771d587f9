"""``kvzip`` — query-agnostic compression by context reconstruction; ``kvzip_dapq`` — the same at DapQ's positions.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (NeurIPS 2025,
arXiv 2505.23416). After the context, the model is asked to repeat it: a "Repeat the previous context
exactly." instruction and the chat template's assistant opener, then the context itself, teacher-forced,
in chunks of 2048 tokens (later chunks after "Repeat the part of the previous context exactly, starting
with" and the previous chunk's last 8 tokens). A key's score is the largest softmax attention it receives
from any reconstruction query of any query head of its KV group (§3.2); the first 4 tokens (sinks) are
kept; the budget is shared by the KV heads of a layer through one top-k (non-uniform head budgets, stored
in a ragged cache, so the memory saving is real).

Here the reconstruction is an appended window (``reconstruct``) that goes through the same forward as
the prompt, so its extra cost is the reconstruction rows only. Departures:

* the repeat instruction is given as token ids (parts see no tokenizer): :func:`kvzip_window` makes them
  for a tokenizer; without them the prompt is repeated with no instruction;
* budgets are shared across the heads of a layer, not across layers: a layer is pruned inside the
  forward before the next layer has run, so the full cache never exists (kvpress's ``layerwise=True``).
  The paper's and kvpress's default rank all layers together: ``allocator="global_layers"``, which holds the
  full cache until every layer is scored (docs/results/query-agnostic.md measures both);
* chunks go through one forward: a later chunk's rows also attend to the earlier chunks' rows, and sit
  after them (positions L + their index in the whole reconstruction), where KVzip runs each chunk on the
  context's cache alone at positions L, L+1, …; the softmax covers every key a row sees (KVzip: the sinks,
  the row's own chunk of the context and its own rows). With one chunk (prompts up to 2048 tokens after
  ``start``) the two agree, up to the template head;
* template-head tokens before ``start`` are not repeated but scored by the attention they receive
  (kvpress scores them 0, so only the 4 sinks among them survive).

In a progressive prefill (``prompt_chunk``) each round repeats its own chunk, on the cache held so far
(the kept rows and the chunk's), and a held row keeps the largest attention any round gave it: KVzip's score
over its reconstruction chunks, for what is still held. The full cache never exists then.

``kvzip_dapq`` tests DapQ's finding (Tian et al. 2026, arXiv 2603.11564: queries at the positions decoding
will occupy match decoding attention better) on KVzip's queries: the same reconstruction, its rows cycling
through the first 32 decoding positions L … L+31 instead of following the context. Measured on SmolLM2-135M
(docs/results/query-agnostic.md) it keeps fewer needles than ``kvzip`` at every budget: the reconstruction
copies its source through relative positions that the cycling breaks. It is kept to reproduce that result;
the cheaper combinations tried there (subsampled reconstructions, DapQ's window scored the KVzip way) did
worse still.
"""

from __future__ import annotations

from typing import Any

from kvpress_like.hookspecs import hookimpl
from kvpress_like.methods_spec import MethodSpec, PartChoice
from kvpress_like.prompting import build_prompt, has_chat_template

INSTRUCTION = "\n\nRepeat the previous context exactly."
RESUME = "\n\nRepeat the part of the previous context exactly, starting with"

KVZIP = MethodSpec(
    name="kvzip",
    summary="the model repeats the prompt; each key keeps the largest attention any reconstruction query gives it",
    paper="Kim et al. 2025, arXiv 2505.23416",
    departures="head budgets shared within a layer, not across layers; chunks in one forward; instruction as ids "
    "(kvzip_window(tokenizer)); see the module docstring",
    window=PartChoice(name="reconstruct", options={"chunk_size": 2048, "overlap": 8}),
    scorer=PartChoice(name="attention", options={"aggregation": "max", "gqa": "max", "pooling": "none"}),
    allocator=PartChoice(name="global"),
    selector=PartChoice(name="topk", options={"sinks": 4}),
)

KVZIP_DAPQ = KVZIP.variant(
    "kvzip_dapq",
    "KVzip's reconstruction with its rows at DapQ's decoding positions L … L+31 (cycling)",
    "Tian et al. 2026, arXiv 2603.11564",
    departures="not either paper's method: KVzip's queries at DapQ's positions (see the module docstring)",
    window=PartChoice(name="reconstruct", options={**KVZIP.window.options, "positions": "decoding", "span": 32}),
)


def kvzip_window(tokenizer, context_start: bool = True) -> dict[str, Any]:
    """``reconstruct`` options with KVzip's instruction ids for ``tokenizer``: ``build("kvzip", window=...)``.

    Each chunk's cue is followed by the chat template's assistant opener (a newline without a chat
    template), as in KVzip. With ``context_start`` the template head that :func:`~kvpress_like.prompting.build_prompt`
    puts before the context is not repeated (KVzip repeats the context only).
    """

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    empty = build_prompt(tokenizer, "")
    opener = empty.input_ids[0, empty.context_length :].tolist() if has_chat_template(tokenizer) else encode("\n")
    options: dict[str, Any] = {
        "instruction_ids": encode(INSTRUCTION), "resume_ids": encode(RESUME), "opener_ids": opener,
    }
    if context_start:
        options["start"] = empty.context_length
    return options


@hookimpl
def register_methods():
    return [KVZIP, KVZIP_DAPQ]

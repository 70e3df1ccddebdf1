"""Structured output with llguidance: a request's constraint compiled for the model's tokenizer, and the masks
that keep each constrained row's next token inside it.

`Grammars` builds llguidance's view of the vocabulary once per model (every id's bytes, specials marked) and
compiles each request's constraint at admission, on the tokenizer thread: anything invalid is refused there
with INVALID naming the field, so nothing invalid reaches the engine. A compiled constraint hands each answer
its own `Matcher`. On the worker, `Masks.apply` fills the constrained rows' allowed-token bitmasks (llguidance,
off the GIL) and sets every other logit to -inf, the LM head's padding past the tokenizer's vocabulary included;
the engine then advances each matcher by the sampled token and ends the answer (STOP) when only the end is left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import jsonschema
import llguidance
import llguidance.torch
import torch

from service.engine.request import Constraint, ConstraintKind
from service.engine.stats import EngineStats
from service.failures import Failure, RequestFailed
from service.models.base import ChatTokenizer

# JSON answers are written compactly (`{"a": 1, "b": [2, 3]}`): flexible whitespace lets a small model pad
# an answer with newlines until its length runs out.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bounds on what one constraint may cost to build and to follow (llguidance's fuel: ~50k/ms to build the
# lexer, ~14k/ms a step); a constraint past them is refused when it is compiled.
PARSER_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=200_000,
                     max_lexer_states=100_000, verbose_errors=False)
COMPILE_SECONDS = 2.0  # a constraint that took longer to compile than this is refused


def _invalid(field: str, message: str) -> RequestFailed:
    return RequestFailed(Failure.INVALID, message, field=field)


class _Vocabulary:
    """The tokenizer as llguidance's TokenizerWrapper takes it: every id's bytes (specials prefixed with 0xFF,
    llguidance's mark for a token that is not text), the end ids, and text -> ids."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int):
        specials = tokenizer.special_token_ids
        pieces = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.tokens = [b"\xff" + piece if i in specials else piece for i, piece in enumerate(pieces)]
        self.eos_token_id = min(tokenizer.eos_token_ids)
        self.bos_token_id = None
        self.special_token_ids = sorted(specials)
        self._tokenizer = tokenizer
        self._ids = {piece: i for i, piece in enumerate(pieces) if piece and i not in specials}  # later ids win
        self._longest = max(map(len, self._ids))

    def __call__(self, data: bytes | str) -> list[int]:
        """Ids whose bytes are exactly `data` (llguidance forces them): the tokenizer's own where they are, else
        spelt greedily from the vocabulary (SentencePiece adds a space in front of text it encodes)."""
        data = data.encode() if isinstance(data, str) else data
        ids = self._tokenizer.encode_text(data.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._spell(data)

    def _spell(self, data: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            size = next((n for n in range(min(self._longest, len(data) - at), 0, -1) if data[at:at + n] in self._ids),
                        0)
            if not size:
                raise ValueError(f"byte {data[at]:#x} has no token")
            ids.append(self._ids[data[at:at + size]])
            at += size
        return ids


class Matcher:
    """One answer's place in its constraint."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.llg = matcher

    def advance(self, token: int) -> None:
        """The sampled `token` joins the answer; RequestFailed if the constraint could not take it (it ran past
        a step's bound: the answer could no longer be guaranteed)."""
        if not self.llg.consume_token(token):
            raise _invalid("params.constraint", f"could not be followed: {self.llg.get_error()}")

    @property
    def finished(self) -> bool:
        """Whether only the end is allowed now: the answer is complete."""
        return self.llg.is_stopped()


class CompiledConstraint:
    """A request's constraint, compiled and checked; each of its answers gets a fresh matcher."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def matcher(self) -> Matcher:
        return Matcher(self._matcher.deep_copy())


class Grammars:
    """The constraint compiler of one model: its tokenizer in llguidance's terms, built once (~1 s)."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int):
        vocabulary = _Vocabulary(tokenizer, vocab_size)
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary), n_vocab=vocab_size,
                                                eos_token=sorted(tokenizer.eos_token_ids))
        self.limits = llguidance.LLParserLimits(**PARSER_LIMITS)

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The constraint ready for the engine; RequestFailed (INVALID, naming params.constraint.<kind>) if it is
        not valid, cannot be enforced or is past the bounds."""
        field = f"params.constraint.{constraint.kind.value}"
        grammar = self._grammar(constraint, field)
        started = time.monotonic()
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        seconds = time.monotonic() - started
        if matcher.is_error():
            raise _invalid(field, _first_line(matcher.get_error()))
        if seconds > COMPILE_SECONDS:
            raise _invalid(field, f"took {seconds:.1f} s to compile, more than the {COMPILE_SECONDS:.0f} s allowed")
        return CompiledConstraint(matcher)

    def _grammar(self, constraint: Constraint, field: str) -> str:
        """llguidance's grammar for the constraint (not yet checked against the tokenizer)."""
        kind, value = constraint.kind, constraint.value
        if kind is ConstraintKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind is ConstraintKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(json_schema(value, field), defaults=JSON_OPTIONS)
        if kind is ConstraintKind.REGEX:
            if not value:
                raise _invalid(field, "must not be empty")
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind is ConstraintKind.CHOICE:
            return llguidance.LLMatcher.grammar_from_lark(choice_grammar(value, field))
        if not value or not value.strip():
            raise _invalid(field, "must not be empty")
        return llguidance.LLMatcher.grammar_from_lark(value)


def json_schema(text: str, field: str) -> dict:
    """The schema in `text`, checked against its JSON Schema metaschema; INVALID if it is not one."""
    try:
        schema = json.loads(text)
    except RecursionError:
        raise _invalid(field, "is nested too deeply") from None
    except ValueError as err:
        raise _invalid(field, f"is not JSON: {err}") from None
    if not isinstance(schema, dict):
        raise _invalid(field, f"must be a JSON object (a schema), got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        raise _invalid(field, f"is not a valid JSON Schema{f' at {where}' if where else ''}: {err.message}") from None
    except RecursionError:
        raise _invalid(field, "is nested too deeply") from None
    return schema


def choice_grammar(values: Sequence[str], field: str) -> str:
    """A Lark grammar whose sentences are exactly the choices."""
    if not values:
        raise _invalid(field, "must list at least one value")
    for i, value in enumerate(values):
        if not value:
            raise _invalid(f"{field}[{i}]", "must not be empty")
    return "start: " + " | ".join(json.dumps(v) for v in values)


def _first_line(message: str) -> str:
    """llguidance's error on one line, at most 300 characters."""
    line = " ".join(message.split()) or "is not valid"
    return line if len(line) <= 300 else line[:297] + "..."


class Masks:
    """The constrained rows' allowed tokens, computed into one bitmask per step and applied to the logits."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device, stats: EngineStats | None = None):
        self.device = device
        self.stats = stats if stats is not None else EngineStats()  # masked_rows, mask_seconds
        self.bitmask = torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)  # [R, W], CPU (llguidance)
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]: a byte's bits, lowest first
        self.lut = torch.where(bits == 1, 0.0, float("-inf")).to(device)  # [256, 8]
        # On an accelerator the CPU cores are free for llguidance's thread pool; on the CPU torch's threads use them
        # all, and a pool's workers waiting for the next step would take cores from the forward: the masks are then
        # filled one row after another on the engine's own thread (16 rows of 49152: ~0.25 ms).
        self.executor = llguidance.LLExecutor() if device.type != "cpu" else None

    def _penalties(self, bitmask: torch.Tensor) -> torch.Tensor:
        """Bitmask [P, W] (bit i of word j: token 32 j + i allowed) -> 0 or -inf per token [P, 32 W] on the device,
        each byte's eight tokens looked up at once (7x faster on a CPU than a masked_fill with the unpacked bits)."""
        data = bitmask.to(self.device, non_blocking=True).view(torch.uint8)  # [P, 4 W]: little-endian bytes
        return self.lut.index_select(0, data.reshape(-1).long()).view(bitmask.shape[0], -1)

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
        """-inf in logits [B, V] on every token a row's matcher does not allow now (rows without one untouched)."""
        started = time.perf_counter()
        picked = [b for b, m in enumerate(matchers) if m is not None]
        if len(picked) > self.bitmask.shape[0]:
            self.bitmask = torch.zeros(len(picked), self.bitmask.shape[1], dtype=torch.int32)
        bitmask = self.bitmask[:len(picked)]  # [P, W]
        if self.executor is not None:
            llguidance.torch.fill_next_token_bitmask_par(
                self.executor, [(matchers[b].llg, i) for i, b in enumerate(picked)], bitmask)
        else:
            for i, b in enumerate(picked):
                llguidance.torch.fill_next_token_bitmask(matchers[b].llg, bitmask, i)
        penalties = self._penalties(bitmask)[:, :logits.shape[-1]]  # [P, V]
        if len(picked) == logits.shape[0]:
            logits.add_(penalties)
        else:
            logits.index_add_(0, torch.tensor(picked, device=logits.device), penalties)
        self.stats.mask_seconds += time.perf_counter() - started
        self.stats.masked_rows += len(picked)

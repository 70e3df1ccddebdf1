"""Checking a chat request before it reaches the engine. Every failure names the field and the allowed range."""

from __future__ import annotations

import math

from service.config import Limits, SamplingDefaults
from service.core.types import ChatInput, GenerationRequest, RequestedParams, SamplingParams
from service.failures import Failure, RequestFailed
from service.models.base import ChatTokenizer, UnsupportedInput

MIN_TEMPERATURE = 0.01  # below this (and above 0) logits overflow to inf; use 0 for greedy
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**64 - 1  # the contract's uint64
MAX_PRIORITY = 1_000_000  # |priority| at most this: room for any scheme of levels, far from int32's ends
MAX_TOP_LOGPROBS = 20  # as OpenAI's
MAX_PENALTY = 2.0  # presence and frequency penalties in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # each bias in [-100, 100], as OpenAI's
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 64


class InvalidRequest(RequestFailed):
    """A request the server will not run (INVALID_ARGUMENT, HTTP 400), naming its field."""

    def __init__(self, field: str, message: str):
        super().__init__(Failure.INVALID, message, field=field)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field, message)


def shown(value: float) -> str:
    """A number as an error message shows it: an integer of hundreds of digits as 1e+400, not in full."""
    if isinstance(value, int) and abs(value) >= 10**16:
        return f"{'-' if value < 0 else ''}1e+{int(math.log10(abs(value)))}"
    return str(value)


def check_unicode(text: str, field: str) -> None:
    """Text that UTF-8 can carry. JSON's escapes can spell a lone surrogate ("\\ud800"), which Python decodes
    into a str that no tokenizer or wire format can encode; protobuf strings never hold one."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(field, f"not valid Unicode (a lone surrogate at character {err.start})") from None


def check_text(chat: ChatInput, limits: Limits) -> None:
    """The prompt, history and system message: present where required, valid Unicode, within size limits."""
    check_unicode(chat.prompt, "prompt")
    _require(chat.prompt.strip() != "", "prompt", "must not be empty or whitespace only")
    _require(len(chat.history) <= limits.max_history_turns, "history",
             f"at most {limits.max_history_turns} turns, got {len(chat.history)}")
    for i, turn in enumerate(chat.history):
        check_unicode(turn.user, f"history[{i}].user")
        check_unicode(turn.assistant, f"history[{i}].assistant")
        _require(turn.user.strip() != "", f"history[{i}].user", "must not be empty")
        _require(turn.assistant.strip() != "", f"history[{i}].assistant", "must not be empty")
    if chat.system is not None:
        check_unicode(chat.system, "system")
        _require(chat.system.strip() != "", "system", "must not be empty when set")
    size = len(chat.prompt) + len(chat.system or "") + sum(len(t.user) + len(t.assistant) for t in chat.history)
    _require(size <= limits.max_prompt_chars, "prompt",
             f"prompt, history and system together must be at most {limits.max_prompt_chars} characters, "
             f"got {size}")


def check_params(p: RequestedParams, limits: Limits, context_length: int, vocab_size: int) -> None:
    """Each sampling field that is set lies in its range. The ranges bound every value the engine consumes, so
    nothing a caller sends can overflow a tensor or a counter (HTTP's integers have no size limit)."""
    if p.max_length is not None:
        _require(1 < p.max_length <= context_length, "params.max_length",
                 f"must be in [2, {context_length}], got {shown(p.max_length)}")
    if p.max_new_tokens is not None:
        _require(1 <= p.max_new_tokens < context_length, "params.max_new_tokens",
                 f"must be in [1, {context_length - 1}], got {shown(p.max_new_tokens)}")
    if p.temperature is not None:
        t = p.temperature
        _require(math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE), "params.temperature",
                 f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t}")
    if p.top_p is not None:
        _require(0 < p.top_p <= 1, "params.top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k is not None:
        _require(0 <= p.top_k <= vocab_size, "params.top_k",
                 f"must be in [0, {vocab_size}] (0 means no limit), got {shown(p.top_k)}")
    if p.seed is not None:
        _require(0 <= p.seed <= MAX_SEED, "params.seed", f"must be in [0, 2^64), got {shown(p.seed)}")
    if p.repetition_penalty is not None:
        r = p.repetition_penalty
        _require(0 < r <= MAX_REPETITION_PENALTY, "params.repetition_penalty",
                 f"must be in (0, {MAX_REPETITION_PENALTY}], got {r}")
    check_sampling_extras(p, limits, context_length, vocab_size)
    _require(len(p.stop) <= limits.max_stop_strings, "params.stop",
             f"at most {limits.max_stop_strings} strings, got {len(p.stop)}")
    for i, s in enumerate(p.stop):
        check_unicode(s, f"params.stop[{i}]")
        _require(0 < len(s) <= limits.max_stop_chars, f"params.stop[{i}]",
                 f"must be 1 to {limits.max_stop_chars} characters, got {len(s)}")


def _in_range(value: float | None, low: float, high: float, field: str) -> None:
    if value is not None:
        _require(math.isfinite(value) and low <= value <= high, field, f"must be in [{low}, {high}], got {value}")


def check_sampling_extras(p: RequestedParams, limits: Limits, context_length: int, vocab_size: int) -> None:
    """min_p, the penalties, logit_bias, stop_token_ids, min_new_tokens, n, top_logprobs and the constraint."""
    _in_range(p.min_p, 0.0, 1.0, "params.min_p")
    _in_range(p.presence_penalty, -MAX_PENALTY, MAX_PENALTY, "params.presence_penalty")
    _in_range(p.frequency_penalty, -MAX_PENALTY, MAX_PENALTY, "params.frequency_penalty")
    if p.top_logprobs is not None:
        _require(0 <= p.top_logprobs <= MAX_TOP_LOGPROBS, "params.top_logprobs",
                 f"must be in [0, {MAX_TOP_LOGPROBS}], got {shown(p.top_logprobs)}")
    if p.n is not None:
        _require(1 <= p.n <= limits.max_n, "params.n", f"must be in [1, {limits.max_n}] (--max-n), got {shown(p.n)}")
    _require(len(p.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "params.logit_bias",
             f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(p.logit_bias)}")
    for token, bias in p.logit_bias:
        _require(0 <= token < vocab_size, f"params.logit_bias[{shown(token)}]",
                 f"the token id must be in [0, {vocab_size}), got {shown(token)}")
        _in_range(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, f"params.logit_bias[{token}]")
    _require(len(p.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "params.stop_token_ids",
             f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(p.stop_token_ids)}")
    for i, token in enumerate(p.stop_token_ids):
        _require(0 <= token < vocab_size, f"params.stop_token_ids[{i}]",
                 f"must be in [0, {vocab_size}), got {shown(token)}")
    if p.min_new_tokens is not None:
        _require(0 <= p.min_new_tokens < context_length, "params.min_new_tokens",
                 f"must be in [0, {context_length - 1}], got {shown(p.min_new_tokens)}")
        if p.max_new_tokens is not None:
            _require(p.min_new_tokens <= p.max_new_tokens, "params.min_new_tokens",
                     f"must be at most max_new_tokens ({p.max_new_tokens}), got {p.min_new_tokens}")
    if p.constraint is not None:
        check_constraint(p, limits)


def check_constraint(p: RequestedParams, limits: Limits) -> None:
    """What can be checked of a constraint before compiling it: its size, and the fields it cannot go with."""
    constraint = p.constraint
    field = f"params.constraint.{constraint.kind.value}"
    values = constraint.value if isinstance(constraint.value, tuple) else (constraint.value or "",)
    for i, value in enumerate(values):
        check_unicode(value, f"{field}[{i}]" if isinstance(constraint.value, tuple) else field)
    size = sum(len(v.encode("utf-8")) for v in values)
    _require(size <= limits.max_constraint_bytes, field,
             f"at most {limits.max_constraint_bytes} bytes (--max-constraint-bytes), got {size}")
    _require(not p.stop, "params.stop", "cannot be combined with a constraint; the constraint decides the end")
    _require(not p.ignore_eos, "params.ignore_eos", "cannot be combined with a constraint, which ends the answer")
    _require(not p.min_new_tokens, "params.min_new_tokens",
             "cannot be combined with a constraint, which may allow only the end sooner")


def check_priority(priority: int) -> None:
    """The scheduling priority (lower runs first) within [-MAX_PRIORITY, MAX_PRIORITY]."""
    _require(-MAX_PRIORITY <= priority <= MAX_PRIORITY, "priority",
             f"must be in [{-MAX_PRIORITY}, {MAX_PRIORITY}] (lower runs first), got {shown(priority)}")


def answer_room(p: RequestedParams, defaults: SamplingDefaults, prompt_tokens: int, context_length: int) -> int:
    """The most tokens the answer may have: what the prompt leaves under max_length (the request's, else the
    default) and the context. InvalidRequest if the request's max_new_tokens or the prompt does not fit. Chat
    (`resolve`) and CountTokens both use it, so they agree on the room and on every refusal."""
    if p.max_new_tokens is not None:
        _require(prompt_tokens + p.max_new_tokens <= context_length, "params.max_new_tokens",
                 f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({p.max_new_tokens}) must fit "
                 f"the context of {context_length} tokens")
    # api.py's default max_length (2048) holds where a prompt fits under it, so such a request gets today's
    # answer; a longer prompt with no max_length of its own may use the model's whole context
    default = defaults.max_length if prompt_tokens < defaults.max_length else context_length
    max_length = min(p.max_length or default, context_length)
    room = max_length - prompt_tokens
    _require(room >= 1, "prompt",
             f"prompt plus history is {prompt_tokens} tokens; it must be under max_length {max_length} "
             f"(the model's context is {context_length})")
    return room


def resolve(p: RequestedParams, defaults: SamplingDefaults, prompt_tokens: int, context_length: int) -> SamplingParams:
    """Fill unset fields from the defaults and fit the answer into max_length and the context (`answer_room`)."""
    room = answer_room(p, defaults, prompt_tokens, context_length)
    return SamplingParams(
        max_new_tokens=min(p.max_new_tokens or defaults.max_new_tokens, room),
        temperature=defaults.temperature if p.temperature is None else p.temperature,
        top_p=defaults.top_p if p.top_p is None else p.top_p,
        top_k=defaults.top_k if p.top_k is None else p.top_k,
        repetition_penalty=defaults.repetition_penalty if p.repetition_penalty is None else p.repetition_penalty,
        seed=p.seed,
        stop=p.stop,
        ignore_eos=p.ignore_eos,
        min_p=p.min_p or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        logit_bias=_merged_bias(p.logit_bias),
        stop_token_ids=p.stop_token_ids,
        min_new_tokens=p.min_new_tokens or 0,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs or 0,
        return_token_ids=p.return_token_ids,
        n=p.n or 1,
    )


def _merged_bias(bias: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """One entry per id (a later entry for the same id wins, as a JSON object's would)."""
    return tuple(dict(bias).items())


def check_input(chat: ChatInput, limits: Limits, context_length: int, vocab_size: int) -> None:
    """The checks that need no tokenizer: cheap enough to run before admission."""
    check_text(chat, limits)
    check_params(chat.params, limits, context_length, vocab_size)
    check_priority(chat.priority)


def encode_prompt(chat: ChatInput, tokenizer: ChatTokenizer) -> list[int]:
    """The prompt ids of a checked chat, or InvalidRequest if the model's chat format refuses it."""
    try:
        return tokenizer.encode_chat(chat.prompt, chat.history, chat.system)
    except UnsupportedInput as err:  # the model's chat format refuses this input, e.g. a system message
        raise InvalidRequest(err.field, err.message) from err


def make_request(chat: ChatInput, prompt_ids: list[int], *, defaults: SamplingDefaults, context_length: int,
                 deadline: float | None) -> GenerationRequest:
    """The GenerationRequest for a checked, encoded chat, or InvalidRequest if it does not fit."""
    params = resolve(chat.params, defaults, len(prompt_ids), context_length)
    return GenerationRequest(request_id=chat.request_id, prompt_ids=prompt_ids, params=params, deadline=deadline,
                             priority=chat.priority)

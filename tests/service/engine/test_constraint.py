"""service/engine/constraint.py on both tokenizers we serve, without the engine: each id's bytes, llguidance's
vocabulary, compiling (and refusing) constraints, the masks over the LM head's padded vocabulary, matchers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine import constraint as constraint_module
from service.engine.constraint import Grammars, Masks, _Vocabulary
from service.engine.request import Constraint, ConstraintKind
from service.failures import Failure, RequestFailed
from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer

GLM_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "chatglm2-tiny" / "tokenizer.model"
GLM_PADDED_VOCAB = 1024  # the fixture's padded_vocab_size; its tokenizer has 1005 ids
TEXT = 'Héllo wörld 日本語 {"a": [1, 2]}\n'


@pytest.fixture(scope="module")
def glm() -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer(GLM_TOKENIZER)


@pytest.fixture(scope="module")
def smol(server):
    return server.engine.loaded.tokenizer


@pytest.fixture(scope="module")
def glm_grammars(glm) -> Grammars:
    return Grammars(glm, GLM_PADDED_VOCAB)


def allowed(grammars: Grammars, vocab: int, matcher) -> list[int]:
    logits = torch.zeros(1, vocab)
    Masks(2, vocab, torch.device("cpu")).apply(logits, [matcher])
    return torch.isfinite(logits[0]).nonzero()[:, 0].tolist()


def test_token_bytes_spell_the_text(smol, glm):
    assert b"".join(smol.token_bytes(i) for i in smol.encode_text(TEXT)) == TEXT.encode()
    # SentencePiece writes the text with a space in front (its dummy prefix), which decoding drops
    assert b"".join(glm.token_bytes(i) for i in glm.encode_text(TEXT)) == b" " + TEXT.encode()
    assert glm.decode(glm.encode_text(TEXT)) == TEXT


def test_special_and_padding_ids(smol, glm):
    assert smol.token_bytes(2) == b"<|im_end|>" and 2 in smol.special_token_ids
    assert glm.token_bytes(glm.eos_id) == b"</s>" and glm.eos_id in glm.special_token_ids
    assert glm.token_bytes(glm.special_ids["[gMASK]"]) == b"[gMASK]"
    assert glm.token_bytes(1010) == b"" and smol.token_bytes(10**6) == b""


def test_the_vocabulary_spells_forced_text_exactly(glm):
    vocabulary = _Vocabulary(glm, GLM_PADDED_VOCAB)
    ids = vocabulary('{"a":')
    assert b"".join(vocabulary.tokens[i] for i in ids) == b'{"a":'  # no space in front
    assert vocabulary.tokens[glm.eos_id] == b"\xff</s>"  # marked as not text


@pytest.mark.parametrize("which", ["smol", "glm"])
def test_choice_allows_only_the_choices_prefixes(request, which):
    tokenizer = request.getfixturevalue(which)
    vocab = request.getfixturevalue("server").engine.loaded.vocab_size if which == "smol" else GLM_PADDED_VOCAB
    grammars = Grammars(tokenizer, vocab) if which == "smol" else request.getfixturevalue("glm_grammars")
    matcher = grammars.compile(Constraint(ConstraintKind.CHOICE, ("yes", "no"))).matcher()
    first = allowed(grammars, vocab, matcher)
    assert first and all(b"yes".startswith(tokenizer.token_bytes(i)) or b"no".startswith(tokenizer.token_bytes(i))
                         for i in first)
    for token in _Vocabulary(tokenizer, vocab)("yes"):
        assert not matcher.finished
        matcher.advance(token)
    assert matcher.finished


def test_masks_cover_the_padded_vocabulary_and_leave_free_rows_alone(glm_grammars, glm):
    compiled = glm_grammars.compile(Constraint(ConstraintKind.REGEX, "[a-z]+"))
    logits = torch.randn(3, GLM_PADDED_VOCAB)
    before = logits.clone()
    masks = Masks(1, GLM_PADDED_VOCAB, torch.device("cpu"))  # fewer rows than asked: it grows
    masks.apply(logits, [None, compiled.matcher(), compiled.matcher()])
    assert torch.equal(logits[0], before[0])
    kept = torch.isfinite(logits[1]).nonzero()[:, 0].tolist()
    assert kept and all(glm.token_bytes(i).strip() and glm.token_bytes(i).isalpha() for i in kept)
    assert not torch.isfinite(logits[1, glm.vocab_size:]).any()  # 1005..1023: padding, never allowed
    assert torch.equal(logits[1][torch.isfinite(logits[1])], before[1][torch.isfinite(logits[1])])
    assert torch.equal(torch.isfinite(logits[1]), torch.isfinite(logits[2]))
    assert masks.stats.masked_rows == 2 and masks.stats.mask_seconds > 0


def test_a_disallowed_token_fails_the_answer_as_invalid(glm_grammars, glm):
    matcher = glm_grammars.compile(Constraint(ConstraintKind.REGEX, "[0-9]+")).matcher()
    with pytest.raises(RequestFailed) as caught:
        matcher.advance(glm.encode_text("hello")[0])
    assert caught.value.kind is Failure.INVALID and caught.value.field == "params.constraint"


def test_each_answer_gets_its_own_matcher(glm_grammars):
    compiled = glm_grammars.compile(Constraint(ConstraintKind.CHOICE, ("ab", "cd")))
    first, second = compiled.matcher(), compiled.matcher()
    for token in spell(glm_grammars, "ab"):
        first.advance(token)
    assert first.finished and not second.finished


def spell(grammars: Grammars, text: str) -> list[int]:
    return grammars.tokenizer.tokenize_str(text)


@pytest.mark.parametrize("kind, value, message", [
    (ConstraintKind.JSON_SCHEMA, "{", "is not JSON"),
    (ConstraintKind.JSON_SCHEMA, "true", "must be a JSON object"),
    (ConstraintKind.JSON_SCHEMA, '{"minimum": "x"}', "is not a valid JSON Schema at minimum"),
    (ConstraintKind.JSON_SCHEMA, '{"not": {"type": "string"}}', "Unimplemented"),
    (ConstraintKind.JSON_SCHEMA, "[" * 50_000, "nested too deeply"),
    (ConstraintKind.REGEX, "a(", "regex"),
    (ConstraintKind.CHOICE, (), "at least one value"),
    (ConstraintKind.GRAMMAR, "start: nope", "unknown name"),
])
def test_bad_constraints_are_refused_naming_the_field(glm_grammars, kind, value, message):
    with pytest.raises(RequestFailed) as caught:
        glm_grammars.compile(Constraint(kind, value))
    assert caught.value.kind is Failure.INVALID
    assert caught.value.field.startswith(f"params.constraint.{kind.value}")
    assert message in caught.value.message


def test_a_constraint_slower_to_compile_than_the_bound_is_refused(glm_grammars, monkeypatch):
    monkeypatch.setattr(constraint_module, "COMPILE_SECONDS", 0.0)
    with pytest.raises(RequestFailed) as caught:
        glm_grammars.compile(Constraint(ConstraintKind.REGEX, "[a-z]+"))
    assert caught.value.field == "params.constraint.regex" and "to compile" in caught.value.message


def test_a_grammar_past_the_parser_bounds_is_refused(glm, monkeypatch):
    """The parser's bounds are the compiler's: with room for 50 grammar symbols, 60 alternatives are refused.
    (llguidance builds its lexer lazily: a regex built to blow up, `(a|b)*a(a|b){400}`, compiles in ~4 ms.)"""
    monkeypatch.setattr(constraint_module, "PARSER_LIMITS", {**constraint_module.PARSER_LIMITS,
                                                             "max_grammar_size": 50})
    grammars = Grammars(glm, GLM_PADDED_VOCAB)
    grammars.compile(Constraint(ConstraintKind.GRAMMAR, 'start: "a" | "b"'))
    with pytest.raises(RequestFailed) as caught:
        grammars.compile(Constraint(ConstraintKind.GRAMMAR, "start: " + " | ".join(f'"w{i}"' for i in range(60))))
    assert caught.value.field == "params.constraint.grammar"

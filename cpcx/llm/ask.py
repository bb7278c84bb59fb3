"""One question to the LLM, answered from the cache or the model, validated, re-asked with feedback.

A question is identified by what decides its answer (see ``cpcx.llm.cache``); the cache stores the final
validated answer of the whole conversation under the key of its *first* request, so a warm run makes no call
at all, retries included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cpcx.errors import CpcxError
from cpcx.llm.answers import AnswerError, Assignment, Shape, answer_schema, parse_answer, validate_answer
from cpcx.llm.cache import CACHE_VERSION, AnswerCache, request_key
from cpcx.llm.providers import ChatProvider, build_provider
from cpcx.redact import redact


@dataclass
class Answer:
    stage: str
    query: int
    key: str
    assignment: Assignment
    value: dict[str, Any]  # what the cache holds: raw, attempts, answer, meta
    cached: bool


@dataclass
class InvalidAnswers(Exception):
    """The model kept answering something unusable; every raw text is kept for the report."""

    label: str
    problems: list[str]
    attempts: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.label}: " + "; ".join(self.problems)


class Asker:
    def __init__(self, llm_cfg: Any, cache: AnswerCache, classes: Sequence[str], shape: Shape, max_retries: int,
                 provider_factory: Callable[[Any], ChatProvider] = build_provider):
        self.cfg = llm_cfg
        self.cache = cache
        self.classes = tuple(classes)
        self.shape = shape
        self.max_retries = max_retries
        self.schema = answer_schema(self.classes, shape)
        self.provider = provider_factory(llm_cfg)  # builds no client yet: dry runs need no key or server
        self.hits = 0
        self.asked = 0  # questions that went to the model (each may take several calls)

    @property
    def calls(self) -> int:
        return self.provider.calls

    def identity(self, messages: list[dict[str, str]], stage: str, query: int) -> dict[str, Any]:
        return {
            "v": CACHE_VERSION, **self.provider.identity(), "messages": messages,
            "schema": self.schema, "shape": self.shape,
            "stage": stage, "query": query,
        }

    def key(self, messages: list[dict[str, str]], stage: str, query: int) -> str:
        return request_key(self.identity(messages, stage, query))

    def ask(self, messages: list[dict[str, str]], stage: str, query: int) -> Answer:
        identity = self.identity(messages, stage, query)
        key = request_key(identity)
        label = f"{stage} query {query}" if stage == "generate" else f"refine iteration {query}"
        value = self.cache.get(key)
        if value is not None:
            try:
                assignment = validate_answer(value["answer"], self.classes)
                self.hits += 1
                return Answer(stage, query, key, assignment, value, cached=True)
            except AnswerError as exc:
                self.cache.warn(f"cached answer {key[:12]}… does not fit the class list ({exc}); asking again")
        if self.cache.mode == "readonly":
            raise CpcxError(f"llm.cache_mode: readonly, and the cache in {self.cache.path.parent} has no answer "
                            f"for {label} (key {key[:12]}…); run once with llm.cache_mode=use, or load answers "
                            "with `cpcx cache import <answers.jsonl>`")
        self.asked += 1
        conversation = list(messages)
        attempts: list[str] = []
        problems: list[str] = []
        for _ in range(self.max_retries + 1):
            # query r of the vote samples with seed + r: independent answers even where the server honours seeds
            seed = self.cfg.seed + query if stage == "generate" else self.cfg.seed
            reply = self.provider.chat(conversation, self.schema if self.cfg.json_schema else None, seed=seed)
            # A model that returns the API key as text: it is redacted before it is parsed, so it reaches
            # neither the cache nor answers.json / clusters.json / invalid-answers.json.
            reply.text = redact(reply.text)
            attempts.append(reply.text)
            try:
                assignment = parse_answer(reply.text, self.classes)
            except AnswerError as exc:
                problems = list(exc.problems)
                if reply.finish_reason == "length":
                    problems.append(f"the answer was cut off at llm.max_tokens={self.cfg.max_tokens}")
                conversation += [{"role": "assistant", "content": reply.text},
                                 {"role": "user", "content": AnswerError(problems).feedback}]
                continue
            value = {
                "raw": reply.text, "attempts": attempts, "meta": reply.meta,
                "answer": [{"name": name, "members": list(members)} for name, members in assignment],
            }
            self.cache.put(key, identity, value)
            return Answer(stage, query, key, assignment, value, cached=False)
        raise InvalidAnswers(label, problems, attempts)

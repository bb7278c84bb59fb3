"""The LLM layer of ``cpcx clusters``: providers (langchain chat models), prompt templates, answer parsing and
validation, and the content-addressed answer cache.

Public entry points: ``build_provider(llm_cfg)``, ``check_llm(llm_cfg, timeout)`` (for ``cpcx doctor``),
``load_template``, ``parse_answer``/``answer_schema``, ``AnswerCache``, ``export_cache``/``import_cache``.
Heavy clients (langchain, openai, ollama) are imported only when a model is actually called.
"""
from cpcx.llm.answers import AnswerError, answer_schema, extract_json, parse_answer, validate_answer
from cpcx.llm.cache import AnswerCache, export_cache, import_cache, request_key
from cpcx.llm.check import check_llm
from cpcx.llm.prompts import PromptTemplate, load_template
from cpcx.llm.providers import ChatProvider, Reply, build_provider

__all__ = [
    "AnswerCache", "AnswerError", "ChatProvider", "PromptTemplate", "Reply", "answer_schema", "build_provider",
    "check_llm", "export_cache", "extract_json", "import_cache", "load_template", "parse_answer", "request_key",
    "validate_answer",
]

"""Structured outputs: pick a guided-decoding backend per request, compile off the step loop, build token bitmasks."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import Grammar, GuidedConstraint, GuidedDecodingBackend

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# `auto` tries backends in this order: fastest per-token mask first (measured with SmolLM2's
# tokenizer, benchmarks/guided_mask_bench.py). Backends registered by other plugins come after.
AUTO_ORDER = ("xgrammar", "llguidance", "outlines", "lm-format-enforcer")
# other spellings clients send (vLLM calls llguidance "guidance")
ALIASES = {"guidance": "llguidance", "lm_format_enforcer": "lm-format-enforcer", "outlines-core": "outlines"}
_PARAM = {"json": "guided_json", "json_object": "response_format", "regex": "guided_regex",
          "choice": "guided_choice", "grammar": "guided_grammar"}

def _normalize(name: str) -> str:
    # vLLM-style options after a colon ("xgrammar:disable-any-whitespace") are accepted and ignored
    base = name.partition(":")[0].strip()
    return ALIASES.get(base, base)


# (requested backend, the server default when none, kind, spec, whitespace_pattern)
CompileKey = tuple[str, str, str, str | None]


@dataclass
class _Request:
    future: Future[tuple[str, Any]]  # (backend name, compiled grammar)
    backend: str | None = None  # known once the future is done
    grammar: Grammar | None = None
    error: str | None = None


class StructuredOutputManager:
    """Owns the guided-decoding state of every request of one engine (one tokenizer).

    The API side calls `validate`; the engine calls `submit` when a request arrives, schedules it
    only once `is_ready`, asks `grammar_bitmask` for the step's masks, and reports each sampled
    token with `accept_token`. Nothing here blocks on a compile.
    """

    def __init__(
        self,
        backends_registry: Any,
        tokenizer: Any,
        vocab_size: int,
        default_backend: str = "auto",
        max_compile_workers: int = 2,
        max_cached_grammars: int = 256,
    ) -> None:
        self._registry = backends_registry
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.default_backend = _normalize(default_backend)
        if self.default_backend != "auto" and self.default_backend not in backends_registry:
            raise InvalidRequestError(self._unknown_message(default_backend), param="guided_decoding_backend")
        self._backends: dict[str, GuidedDecodingBackend] = {}
        self._backend_lock = threading.Lock()
        self._resolved: dict[GuidedConstraint, str] = {}
        self._compiled: OrderedDict[CompileKey, Future[tuple[str, Any]]] = OrderedDict()
        self._max_cached = max_cached_grammars
        self._executor = ThreadPoolExecutor(max_compile_workers, thread_name_prefix="tessera-grammar")
        self._requests: dict[str, _Request] = {}
        self.num_cache_hits = 0

    # -- API side ---------------------------------------------------------------------------------

    def auto_order(self) -> list[str]:
        registered = set(self._registry.names())
        return [n for n in AUTO_ORDER if n in registered] + sorted(registered - set(AUTO_ORDER))

    def validate(self, constraint: GuidedConstraint) -> str:
        """Resolve the backend that will serve `constraint`; InvalidRequestError (a 400) if none can."""
        if constraint in self._resolved:
            return self._resolved[constraint]
        requested = _normalize(constraint.backend) if constraint.backend else None
        param = _PARAM.get(constraint.kind, "guided_decoding")
        if requested is None or requested == "auto":
            # the server default is a preference: when it cannot serve a constraint, the others may
            preferred = [] if self.default_backend == "auto" or requested == "auto" else [self.default_backend]
            order = preferred + [n for n in self.auto_order() if n not in preferred]
            name = self._first_capable(order, constraint, param)
        else:
            if requested not in self._registry:
                raise InvalidRequestError(self._unknown_message(requested), param="guided_decoding_backend")
            name = requested
            backend = self._load(name, is_explicit=True)
            assert backend is not None
            reason = backend.unsupported_reason(constraint)
            if reason is not None:
                raise InvalidRequestError(
                    f"guided_decoding_backend {name!r} cannot serve this {param}: {reason}",
                    param="guided_decoding_backend",
                )
        if len(self._resolved) > 4 * self._max_cached:
            self._resolved.clear()  # a cheap bound; resolving again costs one validation
        self._resolved[constraint] = name
        return name

    def _first_capable(self, order: list[str], constraint: GuidedConstraint, param: str) -> str:
        reasons = []
        for name in order:
            backend = self._load(name, is_explicit=False)
            reason = "it failed to load" if backend is None else backend.unsupported_reason(constraint)
            if reason is None:
                return name
            logger.info("guided decoding: skipping %s for a %s constraint: %s", name, constraint.kind, reason)
            reasons.append(f"{name}: {reason}")
        raise InvalidRequestError(f"no guided-decoding backend can express this {param}: " + "; ".join(reasons), param=param)

    def _unknown_message(self, name: str) -> str:
        known = ", ".join(["auto", *self.auto_order()])
        return f"unknown guided_decoding_backend {name!r}; available: {known}"

    def _load(self, name: str, *, is_explicit: bool) -> GuidedDecodingBackend | None:
        with self._backend_lock:  # validate runs on API threads, submit on the engine thread
            if name not in self._backends:
                try:
                    self._backends[name] = self._registry.get(name)(self.tokenizer, self.vocab_size)
                except Exception as exc:
                    if is_explicit:
                        raise InvalidRequestError(
                            f"guided_decoding_backend {name!r} is unavailable: {exc}", param="guided_decoding_backend"
                        ) from exc
                    logger.warning("guided decoding: backend %s is unavailable: %s", name, exc)
                    return None
            return self._backends[name]

    # -- engine side ------------------------------------------------------------------------------

    def submit(self, request_id: str, constraint: GuidedConstraint) -> None:
        """Start compiling (or reuse the compiled) grammar of a new request; returns at once.

        Choosing the backend happens on the compile thread too: checking a constraint can take
        seconds (the JSON-schema check of a 3,000-property schema took ~5 s), and on the engine's
        loop it held every running request's next token that long."""
        requested = _normalize(constraint.backend) if constraint.backend else self.default_backend
        key: CompileKey = (requested, constraint.kind, constraint.spec, constraint.whitespace_pattern)
        future = self._compiled.get(key)
        if future is None:
            future = self._executor.submit(self._resolve_and_compile, constraint)
            self._compiled[key] = future
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)  # running requests keep their own future
        else:
            self.num_cache_hits += 1
            self._compiled.move_to_end(key)
        self._requests[request_id] = _Request(future)

    def _resolve_and_compile(self, constraint: GuidedConstraint) -> tuple[str, Any]:
        name = self.validate(constraint)
        return name, self._backends[name].compile(constraint)

    def is_ready(self, request_id: str) -> bool:
        """Has the request's grammar compiled (or failed: see `compile_error`)? Never blocks."""
        request = self._requests[request_id]
        if request.grammar is not None or request.error is not None:
            return True
        if not request.future.done():
            return False
        try:
            request.backend, compiled = request.future.result()
            request.grammar = self._backends[request.backend].new_grammar(compiled)
        except Exception as exc:  # compile failed: the engine must finish the request with this error
            backend = request.backend or "guided decoding"
            logger.warning("guided decoding: %s could not compile request %s: %s", backend, request_id, exc)
            request.error = f"{backend} could not compile the constraint: {exc}"
        return True

    def compile_error(self, request_id: str) -> str | None:
        """Why the grammar of a ready request could not be built; the request must then be aborted."""
        return self._requests[request_id].error

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def grammar_bitmask(self, request_ids: list[str]) -> tuple[torch.Tensor | None, dict[str, int]]:
        """The step's masks: int32 (num_rows, ceil(vocab/32)) and request id -> row. Guided,
        ready requests only; (None, {}) when there are none. Bit t of a row set <=> token t allowed."""
        rows: dict[str, int] = {}
        grammars: list[Grammar | None] = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None or not self.is_ready(request_id):
                continue
            rows[request_id] = len(grammars)
            grammars.append(request.grammar)
        if not rows:
            return None, {}
        words = (self.vocab_size + 31) // 32
        # torch is imported here, not at the top: the API process validates constraints with this
        # module and stays free of torch (~200 MB) until a backend library needs it
        import torch

        bitmask = torch.zeros((len(grammars), words), dtype=torch.int32)  # fresh: steps may overlap
        for row, grammar in enumerate(grammars):
            if grammar is None:  # failed compile: nothing allowed but EOS (fail closed)
                self._eos_only(bitmask, row)
            else:
                grammar.fill_bitmask(bitmask, row)
        return bitmask, rows

    def _eos_only(self, bitmask: torch.Tensor, row: int) -> None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < self.vocab_size:
            word, bit = divmod(eos, 32)
            bitmask[row, word] = -(1 << 31) if bit == 31 else 1 << bit  # int32: bit 31 is the sign

    def accept_token(self, request_id: str, token_id: int) -> bool:
        """Advance the request's grammar; False means the token broke the constraint: the engine
        must stop the request rather than emit unconstrained text."""
        request = self._requests.get(request_id)
        if request is None or request.grammar is None:
            return False
        is_ok = request.grammar.accept_token(token_id)
        if not is_ok:
            logger.warning("guided decoding: request %s sampled token %d outside its grammar", request_id, token_id)
        return is_ok

    def is_terminated(self, request_id: str) -> bool:
        request = self._requests.get(request_id)
        return request is not None and request.grammar is not None and request.grammar.is_terminated()

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""KV persistence for any LangGraph graph: ``KVCheckpointer`` makes every checkpoint of a thread carry
the KV state of that thread's context, so a thread resumed after a crash, a time travel to a past
checkpoint and a fork from one all start from that checkpoint's KV state instead of prefilling the
history again.

How it fits together:

* ``ChatHCAttention(store=..., per_thread=True)`` answers each LangGraph thread from its own context,
  whose id is the ``thread_id`` (LangGraph passes it to every model call in the run's metadata), and,
  once a call in a graph task has answered, stores the context's KV state under ``(thread_id, task
  id)`` — before the task's writes reach the checkpointer, so a kill leaves a KV state without its
  checkpoint at worst, never the reverse.  The store addresses tensor chunks by content and cuts them
  at fixed rows (``KV_CHUNK_BYTES``), so a step writes the chunks of its new rows and a branch shares
  its parent's.
* A checkpoint's KV state is the one the last model task before it left: for a checkpoint the graph's
  loop wrote, a task run from its parent (the parent's ``pending_writes`` name it), or else the parent's
  own.  Tool steps, ``update_state`` and the input leave the KV state as it was.  Keying by task, not by
  the checkpoint ``put``, is what keeps this right when LangGraph saves checkpoints in the background
  (``durability="async"``, the default) while the next model step is already answering.
* ``KVCheckpointer(saver, chat)`` wraps any ``BaseCheckpointSaver`` (``SqliteSaver``, ``PostgresSaver``,
  ``InMemorySaver``...) and delegates every call to it.  When LangGraph loads a checkpoint (``get_tuple``:
  a run starting or resuming, ``invoke(None, config_with_checkpoint_id)``, ``update_state``), the
  thread's live context is restored to that checkpoint's KV state unless it holds exactly those tokens
  already: the next model call prefills only the messages added since.  A fork (``update_state`` on a
  past checkpoint) continues from its parent's KV state, and the original branch's checkpoints keep
  theirs: invoking one again answers as before.
* The KV state is a cache, never the truth: each model call re-sends the whole history, and the context
  answers it exactly as a fresh prefill would (it crops what does not match), so a checkpoint without
  KV state (before the first model call, a subgraph's, one more than ``ANCESTORS`` steps past the last
  model task, a thread copied by ``copy_thread``) only costs prefill time.

``get_state`` loads a checkpoint too, so inspecting an old one restores its KV state; the next run
restores its own again.  ``prune`` and ``delete_for_runs`` (where the wrapped saver implements them) also
delete the KV states that no remaining checkpoint leads to; ``delete_thread`` deletes all of the thread's.  Subgraph checkpoints (a non-empty ``checkpoint_ns``) are delegated only: the
thread's one context belongs to the root graph.  One model call per step and thread: parallel model
nodes would share the thread's context.

The example tools (``Tools``: pages of a long file, a calculator safe on model output, a glossary)
are used by ``examples/agent_checkpoint.py``.  Needs ``pip install 'hcmemory[agents]'``.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import math
import operator
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

try:
    from langchain_core.runnables import RunnableConfig
    from langchain_core.tools import BaseTool, tool
    from langgraph.checkpoint.base import (BaseCheckpointSaver, ChannelVersions, Checkpoint, CheckpointMetadata,
                                           CheckpointTuple, DeltaChannelHistory)
    from pydantic import Field
    from simpleeval import InvalidExpression, SimpleEval
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory.integrations.langgraph needs langgraph: pip install 'hcmemory[agents]'") from exc

from hcmemory import ContextStore
from hcmemory.pool import REUSE_TAG
from hcmemory.stores import DEFAULT_TAG
from hcmemory.integrations.langchain import ChatHCAttention, kv_store

log = logging.getLogger(__name__)

ANCESTORS = 16
"""How many checkpoints back from a checkpoint the last model task's KV state is looked for."""


class KVCheckpointer(BaseCheckpointSaver):
    """A checkpointer whose checkpoints carry the KV state of their thread's context (see the module
    docstring).  ``saver`` holds the graph's checkpoints; ``chat`` (with ``store`` and
    ``per_thread=True``) is the model whose contexts are kept, in ``chat.store``."""

    def __init__(self, saver: BaseCheckpointSaver, chat: ChatHCAttention) -> None:
        if not isinstance(saver, BaseCheckpointSaver):
            raise TypeError(f"saver must be a LangGraph BaseCheckpointSaver (e.g. SqliteSaver), not "
                            f"{type(saver).__name__}")
        if not isinstance(chat, ChatHCAttention):
            raise TypeError(f"chat must be the ChatHCAttention the graph calls, not {type(chat).__name__}")
        if chat.store is None or not chat.per_thread:
            raise ValueError("KVCheckpointer needs ChatHCAttention(store=..., per_thread=True): each thread needs its "
                             "own context, whose KV states go to the store")
        super().__init__(serde=saver.serde)
        self.saver = saver
        self.chat = chat

    @property
    def store(self) -> ContextStore:
        """Where the model's per-task KV states are (``chat.store``)."""
        return kv_store(self.chat.store)

    @property
    def config_specs(self) -> list:
        return self.saver.config_specs

    # --- the KV side -----------------------------------------------------------------------------
    def kv_state(self, config: RunnableConfig) -> str | None:
        """The tag (a model task's id) of the KV state of ``config``'s checkpoint in ``store``, under the
        thread's id; None when there is none (see the module docstring), or for a subgraph's checkpoint."""
        configurable = config.get("configurable", {})
        thread = configurable.get("thread_id")
        if thread is None or configurable.get("checkpoint_ns"):
            return None
        found = self.saver.get_tuple(config)
        for _ in range(ANCESTORS):
            if found is None or found.parent_config is None:
                return None
            parent = self.saver.get_tuple(found.parent_config)
            if parent is None:
                return None
            if found.metadata.get("source") == "loop":
                for task, _, _ in reversed(parent.pending_writes or []):
                    if self.store.exists(str(thread), task):
                        return task
            found = parent
        return None

    def restore_kv(self, found: CheckpointTuple | None) -> None:
        """Make the thread's live context hold the KV state of checkpoint ``found``, unless it holds
        exactly those tokens already (or the checkpoint has none)."""
        tag = None if found is None else self.kv_state(found.config)
        if tag is None:
            return
        thread = str(found.config["configurable"]["thread_id"])
        engine = self.chat.engine()
        ctx = engine.pool.get(thread)
        if ctx.token_ids == self.store.token_ids(thread, tag):
            return
        ctx.restore(self.store.load(thread, engine.model, engine.tokenizer, tag))
        log.info("thread %r: KV state of task %s restored (%d tokens)", thread, tag, len(ctx))

    def _forget_thread(self, thread_id: str) -> None:
        pool = self.chat.engine().pool
        if str(thread_id) in pool:
            pool.delete(str(thread_id))

    def _drop_unreachable_kv(self, thread_ids: Iterable[str]) -> None:
        """Delete the KV states of these threads that no remaining checkpoint leads to any more (after a prune
        or a run's deletion), so the store keeps only what a checkpoint can restore.  Only model tasks' states
        go: the pool's own checkpoints of the thread (``DEFAULT_TAG``, ``REUSE_TAG``) stay."""
        for thread in sorted({str(t) for t in thread_ids}):
            if thread not in self.store:
                continue
            remaining = self.saver.list({"configurable": {"thread_id": thread}})
            reachable = {self.kv_state(found.config) for found in remaining}
            for entry in self.store.checkpoints(thread):
                if entry["tag"] not in reachable and entry["tag"] not in (DEFAULT_TAG, REUSE_TAG):
                    self.store.delete(thread, entry["tag"])
                    log.info("thread %r: KV state of task %s deleted, no checkpoint leads to it", thread, entry["tag"])

    # --- BaseCheckpointSaver, delegated ----------------------------------------------------------
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        found = self.saver.get_tuple(config)
        self.restore_kv(found)
        return found

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        return self.saver.list(config, filter=filter, before=before, limit=limit)

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        return self.saver.put(config, checkpoint, metadata, new_versions)

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self.saver.put_writes(config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self.saver.delete_thread(thread_id)
        self._forget_thread(thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.saver.delete_for_runs(run_ids)
        self._drop_unreachable_kv(self.store.list())  # checkpoints do not say their run: every thread is looked at

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self.saver.copy_thread(source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self.saver.prune(thread_ids, strategy=strategy)
        if strategy == "delete":
            for thread in thread_ids:
                self._forget_thread(thread)
        self._drop_unreachable_kv(thread_ids)

    def get_delta_channel_history(self, *, config: RunnableConfig,
                                  channels: Sequence[str]) -> Mapping[str, DeltaChannelHistory]:
        return self.saver.get_delta_channel_history(config=config, channels=channels)

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self.saver.get_next_version(current, channel)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        found = await self.saver.aget_tuple(config)
        await asyncio.to_thread(self.restore_kv, found)
        return found

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        async for item in self.saver.alist(config, filter=filter, before=before, limit=limit):
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        return await self.saver.aput(config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        await self.saver.aput_writes(config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self.saver.adelete_thread(thread_id)
        await asyncio.to_thread(self._forget_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self.saver.adelete_for_runs(run_ids)
        await asyncio.to_thread(lambda: self._drop_unreachable_kv(self.store.list()))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self.saver.acopy_thread(source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self.saver.aprune(thread_ids, strategy=strategy)
        for thread in thread_ids if strategy == "delete" else ():
            await asyncio.to_thread(self._forget_thread, thread)
        await asyncio.to_thread(self._drop_unreachable_kv, thread_ids)

    async def aget_delta_channel_history(self, *, config: RunnableConfig,
                                         channels: Sequence[str]) -> Mapping[str, DeltaChannelHistory]:
        return await self.saver.aget_delta_channel_history(config=config, channels=channels)


# --- the example agent's tools --------------------------------------------------------------------

MAX_DIGITS = 100
"""The calculator refuses numbers of more digits, operands and results alike: model output may ask for
``9**9**9``, whose digits alone take minutes to compute."""
MAX_EXPRESSION = 200
"""Characters of one calculator expression (a deeply nested one would exhaust the parser's stack)."""


def _bounded(value: Any) -> Any:
    """``value`` when it is a real number under ``MAX_DIGITS`` digits (checked after every operation, so no
    step starts from a number too large to compute with)."""
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) < 10 ** MAX_DIGITS:
        raise ValueError(f"a number of more than {MAX_DIGITS} digits")
    return value


def _power(base: float, exponent: float) -> float:
    """``base ** exponent``, refused before it is computed when its result would pass ``MAX_DIGITS``."""
    if abs(base) not in (0, 1) and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise ValueError(f"{base}**{exponent} has more than {MAX_DIGITS} digits")
    return base ** exponent


def _checked(op: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *operands: _bounded(op(*operands))


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power, ast.USub: operator.neg,
               ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Arithmetic on numbers only (``simpleeval`` with no names or functions, and every operand and
    result under ``MAX_DIGITS`` digits): safe to run on model output.  ``ValueError`` says what is wrong."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    evaluator = SimpleEval(operators={node: _checked(op) for node, op in _ARITHMETIC.items()}, functions={}, names={})
    try:
        return _bounded(evaluator.eval(expression.strip()))
    except (InvalidExpression, SyntaxError, TypeError, RecursionError) as exc:
        raise ValueError(f"not arithmetic on numbers ({type(exc).__name__}: {exc})") from exc


def page_number(argument: str) -> int | None:
    """The page a ``read_page`` argument names (ASCII digits, quotes and spaces around allowed), else None:
    ``str.isdigit`` also accepts characters such as ``²`` that ``int`` refuses."""
    argument = argument.strip().strip("'\"").strip()
    return int(argument) if re.fullmatch(r"[0-9]{1,9}", argument) else None


@dataclass
class Tools:
    """The example agent's deterministic tools over one long text file (``langchain_tools()`` gives
    them to ``bind_tools`` and LangGraph's ``ToolNode``)."""

    path: Path
    page_chars: int = 1200
    glossary: dict[str, str] = field(default_factory=dict)

    def pages(self) -> list[str]:
        text = Path(self.path).read_text(encoding="utf-8")
        return [text[i:i + self.page_chars] for i in range(0, len(text), self.page_chars)]

    def run(self, tool: str, argument: str) -> str:
        argument = argument.strip().strip("'\"")
        if tool == "read_page":
            pages = self.pages()
            number = page_number(argument)
            if number is None or not 1 <= number <= len(pages):
                return (f"read_page takes a page number from 1 to {len(pages)}, e.g. read_page(1); "
                        f"{argument!r} is not one.")
            return f"Page {number} of {len(pages)}:\n{pages[number - 1]}"
        if tool == "calculator":
            try:
                return f"{argument} = {calculate(argument):g}"
            except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
                return f"calculator error: {exc}"
        if tool == "lookup":
            return self.glossary.get(argument.lower(), f"No entry for {argument!r}.")
        return f"Unknown tool {tool!r}; tools: read_page, calculator, lookup."

    def langchain_tools(self) -> list[BaseTool]:
        """``read_page``, ``calculator`` and ``lookup`` as LangChain tools; string arguments are bounded in
        their schemas, so a model repeating itself inside one cannot run a call past its token budget."""

        @tool
        def read_page(number: int) -> str:
            """Read one page of the file, numbered from 1."""
            return self.run("read_page", str(number))

        @tool
        def calculator(expression: Annotated[str, Field(max_length=MAX_EXPRESSION)]) -> str:
            """Evaluate an arithmetic expression, e.g. 2 * (3 + 4)."""
            return self.run("calculator", expression)

        @tool
        def lookup(term: Annotated[str, Field(max_length=40)]) -> str:
            """Explain a term from the glossary."""
            return self.run("lookup", term)

        return [read_page, calculator, lookup]

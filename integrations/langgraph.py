"""An agent loop (LangGraph) whose KV state is checkpointed per thread next to LangGraph's own checkpoint.

The graph is the usual one: a model node (``ChatHCAttention``) and a tool node with a few
deterministic tools — ``read_page`` (the next page of a long file), ``calculator`` and ``lookup`` —
looping until the model answers.  LangGraph's SQLite checkpointer keeps the graph state (the
messages) per ``thread_id``; a ``ContextStore`` beside it keeps that thread's KV state, saved after
every model step.  A run killed at any point resumes from the same ``thread_id`` in a new process:
LangGraph re-sends the history, the context reloaded from the store already holds it, and only the
messages added since are prefilled (each step reports ``tokens_prefilled``).  If the two
checkpoints disagree (a kill between them), prefix matching crops the KV state back to what the
graph state holds, so they can never drift apart.

The embedded 135M model does not call tools reliably, so its text is parsed for
``ACTION: tool(argument)`` and, when it names no valid action and gives no ``ANSWER:``, the loop
falls back to reading the next page: the point is the mechanics.  Needs
``pip install 'hcmemory[agents]'``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, MessagesState, StateGraph
    from simpleeval import InvalidExpression, SimpleEval
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hcmemory.integrations.langgraph needs langgraph: pip install 'hcmemory[agents]'") from exc

from hcmemory.integrations.langchain import ChatHCAttention

SYSTEM = ("You are a careful agent answering a question about a long file you read page by page. To use a tool, "
          "reply with one line `ACTION: tool(argument)`. Tools: read_page(number) returns a page of the file; "
          "calculator(expression) does arithmetic; lookup(term) explains a term. When you know the answer, reply "
          "`ANSWER: <answer>`.")
_ACTION = re.compile(r"ACTION:\s*(\w+)\s*\((.*?)\)", re.DOTALL)
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
    """The agent's deterministic tools over one long text file."""

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


class AgentState(MessagesState):
    page: int
    steps: int


def next_action(text: str, state: dict[str, Any], pages: int) -> tuple[str, str] | None:
    """The tool call the model's text asks for; the next page when it asks for nothing usable; None
    when it answered (or there is nothing left to read)."""
    if "ANSWER:" in text:
        return None
    found = _ACTION.search(text)
    if found and found.group(1) in ("read_page", "calculator", "lookup"):
        return found.group(1), found.group(2)
    following = state.get("page", 0) + 1
    return ("read_page", str(following)) if following <= pages else None


def build_agent(chat: ChatHCAttention, tools: Tools, checkpointer: SqliteSaver, max_steps: int = 12,
                on_step: Callable[[dict[str, Any]], None] | None = None):
    """The compiled graph.  ``chat`` needs a ``store`` (its KV state is saved there after every step);
    ``on_step`` receives each model step's counters."""
    if chat.store is None:
        raise ValueError("the agent's ChatHCAttention needs store=... to checkpoint its KV state per thread")
    pages = len(tools.pages())

    def model(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        thread = config["configurable"]["thread_id"]
        reply = chat.invoke([SystemMessage(SYSTEM), *state["messages"]], context_id=thread)
        chat.engine().pool.save(thread)  # the KV checkpoint of this step, next to LangGraph's
        if on_step:
            on_step({"thread_id": thread, "step": state.get("steps", 0) + 1, "prompt_tokens":
                     reply.usage_metadata["input_tokens"], **reply.response_metadata})
        return {"messages": [reply], "steps": state.get("steps", 0) + 1}

    def act(state: AgentState) -> dict[str, Any]:
        tool, argument = next_action(state["messages"][-1].content, state, pages)
        update: dict[str, Any] = {"messages": [HumanMessage(f"Observation: {tools.run(tool, argument)}")]}
        number = page_number(argument) if tool == "read_page" else None
        if number is not None and 1 <= number <= pages:
            update["page"] = number
        return update

    def route(state: AgentState) -> str:
        if state.get("steps", 0) >= max_steps:
            return END
        return "tools" if next_action(state["messages"][-1].content, state, pages) else END

    graph = StateGraph(AgentState)
    graph.add_node("model", model)
    graph.add_node("tools", act)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=checkpointer)


def checkpointer(path: str | Path) -> SqliteSaver:
    """LangGraph's SQLite checkpointer on ``path`` (usable from the graph's worker threads)."""
    return SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))


def run(task: str, thread_id: str, workdir: str | Path, tools: Tools, chat: ChatHCAttention | None = None,
        max_steps: int = 12, on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume, when ``thread_id`` has a checkpoint) the agent; returns the final graph state.

    ``workdir`` holds ``graph.sqlite`` (LangGraph's checkpoints) and ``kv.sqlite`` (the KV states)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chat = chat or ChatHCAttention(store=str(workdir / "kv.sqlite"), max_tokens=48)
    saver = checkpointer(workdir / "graph.sqlite")
    agent = build_agent(chat, tools, saver, max_steps, on_step)
    config: RunnableConfig = {"configurable": {"thread_id": thread_id}, "recursion_limit": 4 * max_steps + 4}
    started = agent.get_state(config).values.get("messages")
    return agent.invoke(None if started else {"messages": [HumanMessage(task)], "page": 0, "steps": 0}, config)


def final_answer(state: dict[str, Any]) -> str:
    """The last model message's answer (its text after ``ANSWER:``, or all of it)."""
    last = next((m for m in reversed(state["messages"]) if isinstance(m, AIMessage)), None)
    text = "" if last is None else last.content
    return text.split("ANSWER:", 1)[1].strip() if "ANSWER:" in text else text.strip()

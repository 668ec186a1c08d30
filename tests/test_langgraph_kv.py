"""KV persistence for a LangGraph graph built the way LangGraph's docs build a tool-calling agent
(``ToolNode`` + ``tools_condition``), with ``ChatHCAttention.bind_tools`` and ``KVCheckpointer``:
it calls a tool, gets its result and answers; killed (kill -9) in the middle and resumed in a new
process, it prefills only what the last checkpoint lacks; time travel to a checkpoint reuses that
checkpoint's KV state; a fork from a past checkpoint leaves the original branch's next turn unchanged."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph", reason="LangGraph (the agents extra) is not installed in this environment")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from langgraph.graph import START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from hcmemory import ContextStore  # noqa: E402
from hcmemory.context import _shared_prefix  # noqa: E402
from hcmemory.integrations.langchain import ChatHCAttention, message_dicts  # noqa: E402
from hcmemory.integrations.langgraph import KVCheckpointer  # noqa: E402
from hcmemory.pool import REUSE_TAG  # noqa: E402
from hcmemory.stores import DEFAULT_TAG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is 6 times 7? Use the multiply tool."
STEPS: list[dict[str, Any]] = []
"""Each model step's ``response_metadata`` (context, tokens reused and prefilled)."""


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    if os.environ.get("HC_TEST_BLOCK_TOOL"):
        print("TOOL", flush=True)
        signal.pause()  # the parent kills this process here, inside the tool node
    return a * b


def build(workdir: Path, saver: Any = None):
    """The docs' tool-calling agent; the model must call a tool first and answers once it has a result.
    Its checkpoints go to ``saver`` (a SqliteSaver in ``workdir`` by default)."""
    chat = ChatHCAttention(store=str(workdir / "kv.sqlite"), per_thread=True, max_tokens=40)
    call, answer = chat.bind_tools([multiply], tool_choice="any"), chat.bind_tools([multiply], tool_choice="none")

    def agent(state: MessagesState) -> dict[str, Any]:
        llm = answer if isinstance(state["messages"][-1], ToolMessage) else call
        reply = llm.invoke(state["messages"])
        STEPS.append(reply.response_metadata)
        print(json.dumps({k: reply.response_metadata[k] for k in ("tokens_reused", "tokens_prefilled")}), flush=True)
        return {"messages": [reply]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([multiply]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    saver = saver or SqliteSaver(sqlite3.connect(str(workdir / "graph.sqlite"), check_same_thread=False))
    return graph.compile(checkpointer=KVCheckpointer(saver, chat)), chat


def config(thread: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    configurable = {"thread_id": thread} | ({"checkpoint_id": checkpoint_id} if checkpoint_id else {})
    return {"configurable": configurable}


def check_tool_turn(messages: list[Any]) -> None:
    """Human, a call to multiply, its result, a plain answer."""
    human, call, result, reply = messages[-4:]
    assert isinstance(human, HumanMessage) and isinstance(call, AIMessage) and isinstance(result, ToolMessage)
    (made,) = call.tool_calls
    assert made["name"] == "multiply" and made["id"].startswith("call_") and set(made["args"]) == {"a", "b"}
    assert result.tool_call_id == made["id"] and result.content == str(made["args"]["a"] * made["args"]["b"])
    assert isinstance(reply, AIMessage) and not reply.tool_calls and reply.content.strip()


def lacking(app: Any, chat: ChatHCAttention, snapshot: Any) -> int:
    """Tokens of the prompt for ``snapshot``'s messages that the KV state serving it lacks."""
    engine = chat.engine()
    prompt = engine.message_ids(message_dicts(snapshot.values["messages"], tool_prompt(chat)))
    kv = app.checkpointer.kv_state(snapshot.config)
    assert kv is not None, "a model step's KV state serves every later checkpoint"
    with ContextStore(chat.store) as store:
        held = store.token_ids(snapshot.config["configurable"]["thread_id"], kv)
    assert _shared_prefix(held, prompt) >= len(held) - 2, "the KV state covers the history it was stored with"
    return len(prompt) - _shared_prefix(held, prompt)


def tool_prompt(chat: ChatHCAttention):
    from hcmemory.integrations.langchain import tool_constraint

    return tool_constraint([multiply], "none", None)


def test_agent_calls_a_tool_answers_and_travels_back_without_prefilling_history(tmp_path):
    app, chat = build(tmp_path)
    STEPS.clear()
    state = app.invoke({"messages": [HumanMessage(QUESTION)]}, config("travel"))
    check_tool_turn(state["messages"])
    history = list(app.get_state_history(config("travel")))
    after_tool = next(s for s in history if s.next == ("agent",) and isinstance(s.values["messages"][-1], ToolMessage))
    # the answering step prefilled only the tool's result and the turn framing
    assert STEPS[1]["tokens_prefilled"] <= lacking(app, chat, after_tool)
    # time travel: back to the checkpoint after the tool ran, and answer again from there
    live = chat.engine().pool.get("travel")
    with ContextStore(chat.store) as store:
        held = store.token_ids("travel", app.checkpointer.kv_state(after_tool.config))
    assert len(live) > len(held)  # the live context holds the answer too
    STEPS.clear()
    again = app.invoke(None, after_tool.config)
    assert again["messages"][-1].content == state["messages"][-1].content
    assert STEPS[0]["tokens_prefilled"] <= lacking(app, chat, after_tool)


def test_a_fork_leaves_the_original_branch_unchanged(tmp_path):
    app, chat = build(tmp_path)
    first = app.invoke({"messages": [HumanMessage(QUESTION)]}, config("fork"))
    latest = app.get_state(config("fork")).config["configurable"]["checkpoint_id"]
    follow_up = {"messages": [HumanMessage("And 2 times 3?")]}
    reference = app.invoke(follow_up, config("fork", latest))["messages"][len(first["messages"]):]
    # a branch from the checkpoint after the first tool result, with a message of its own
    history = list(app.get_state_history(config("fork")))
    after_tool = next(s for s in reversed(history)
                      if s.next == ("agent",) and isinstance(s.values["messages"][-1], ToolMessage))
    branch = app.update_state(after_tool.config, {"messages": [HumanMessage("Say it in words.")]})
    assert branch["configurable"]["checkpoint_id"] != after_tool.config["configurable"]["checkpoint_id"]
    forked = app.invoke(None, branch)
    assert isinstance(forked["messages"][-1], AIMessage)
    # the original branch's next turn, taken again from its own checkpoint, is what it was before the fork
    STEPS.clear()
    replay = app.invoke(follow_up, config("fork", latest))["messages"][len(first["messages"]):]
    assert [(type(m), m.content, [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]) for m in replay] == [
        (type(m), m.content, [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]) for m in reference]
    assert STEPS[0]["tokens_prefilled"] <= lacking(app, chat, app.get_state(config("fork", latest))) + 20  # + the message


AGENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from langchain_core.messages import HumanMessage
    from tests.test_langgraph_kv import QUESTION, build, config
    app, _ = build(Path(sys.argv[1]))
    app.invoke({"messages": [HumanMessage(QUESTION)]} if sys.argv[2] == "start" else None, config("killed"),
               durability="sync")  # each step's checkpoint is on disk before the next step runs
    print("DONE", flush=True)
""")


def test_killed_mid_run_resumes_prefilling_only_what_the_last_checkpoint_lacks(tmp_path):
    env = {**os.environ, "HC_TEST_BLOCK_TOOL": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path), "start"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        first = json.loads(child.stdout.readline())  # the model's step, checkpointed before the tool node
        assert child.stdout.readline().strip() == "TOOL"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert first["tokens_reused"] == 0
    env.pop("HC_TEST_BLOCK_TOOL")
    resumed = subprocess.run([sys.executable, "-c", AGENT, str(tmp_path), "resume"], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=600)
    assert resumed.returncode == 0 and resumed.stdout.splitlines()[-1] == "DONE", resumed.stderr[-2000:]
    step = json.loads(resumed.stdout.splitlines()[0])  # the answering step, in the new process
    app, chat = build(tmp_path)
    state = app.get_state(config("killed"))
    check_tool_turn(state.values["messages"])
    # the last checkpoint before the answer holds the KV state the killed process saved with the call
    before_answer = next(s for s in app.get_state_history(config("killed"))
                         if s.next == ("agent",) and isinstance(s.values["messages"][-1], ToolMessage))
    assert step["tokens_reused"] > 0
    assert step["tokens_prefilled"] <= lacking(app, chat, before_answer)


class PruningSaver(InMemorySaver):
    """InMemorySaver with the ``prune`` LangGraph documents, which it leaves to other savers: ``keep_latest``
    keeps each namespace's newest checkpoint (and its writes), ``delete`` the whole thread."""

    def prune(self, thread_ids, *, strategy="keep_latest"):
        for thread in thread_ids:
            if strategy == "delete":
                self.delete_thread(thread)
                continue
            for ns, checkpoints in self.storage.get(thread, {}).items():
                latest = max(checkpoints)
                for old in [c for c in checkpoints if c != latest]:
                    del checkpoints[old]
                    self.writes.pop((thread, ns, old), None)


def test_prune_deletes_the_kv_states_no_checkpoint_leads_to(tmp_path):
    app, chat = build(tmp_path, PruningSaver())
    for thread in ("kept", "pruned"):
        app.invoke({"messages": [HumanMessage(QUESTION)]}, config(thread))
    store = app.checkpointer.store

    def tasks(thread: str) -> set[str]:
        return {c["tag"] for c in store.checkpoints(thread)} - {DEFAULT_TAG, REUSE_TAG}

    kept = tasks("kept")
    assert len(kept) == 2 and len(tasks("pruned")) == 2  # the call and the answer
    app.checkpointer.prune(["pruned"])
    # the newest checkpoint's parent (which named the model task) is gone, so no KV state is reachable
    assert tasks("pruned") == set() and tasks("kept") == kept
    follow_up = app.invoke({"messages": [HumanMessage("And 2 times 3?")]}, config("pruned"))
    assert isinstance(follow_up["messages"][-1], AIMessage)  # the KV state is a cache: the thread goes on
    app.checkpointer.prune(["pruned"], strategy="delete")
    assert "pruned" not in store and "pruned" not in chat.engine().pool and tasks("kept") == kept

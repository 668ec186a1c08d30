"""A LangGraph tool-calling agent (LangGraph's prebuilt ``ToolNode`` and ``tools_condition``) whose KV
state is checkpointed with the graph by ``KVCheckpointer``: killed in the middle of its run and resumed
in a new process, the resumed steps prefill only the messages added since the last checkpoint.

The model calls real tools through ``bind_tools``: constrained decoding makes every call parse, even
from the 135M model.  Its first step must read a page (``tool_choice="read_page"``), later ones choose
between another call and an answer (``"auto"``), and after ``MAX_CALLS`` tool results it answers
(``"none"``); one call per step (``parallel_tool_calls=False``).
"""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

AGENT = """
import json, sqlite3, sys
from pathlib import Path
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from hcmemory.integrations.langchain import ChatHCAttention
from hcmemory.integrations.langgraph import KVCheckpointer, Tools

MAX_CALLS = 3
workdir = Path(sys.argv[1])
tools = Tools(workdir / "log.txt", page_chars=400).langchain_tools()
chat = ChatHCAttention(store=str(workdir / "kv.sqlite"), per_thread=True, max_tokens=64)
first, more, answer = (chat.bind_tools(tools, tool_choice=choice, parallel_tool_calls=False)
                       for choice in ("read_page", "auto", "none"))
SYSTEM = SystemMessage("You answer questions about an expedition log. Read its pages with read_page.")

def agent(state: MessagesState):
    calls = sum(isinstance(m, ToolMessage) for m in state["messages"])
    llm = first if calls == 0 else more if calls < MAX_CALLS else answer
    reply = llm.invoke([SYSTEM, *state["messages"]])
    print(json.dumps({"step": calls + 1, "calls": [c["name"] + json.dumps(c["args"]) for c in reply.tool_calls],
                      "tokens_reused": reply.response_metadata["tokens_reused"],
                      "tokens_prefilled": reply.response_metadata["tokens_prefilled"]}), flush=True)
    return {"messages": [reply]}

graph = StateGraph(MessagesState)
graph.add_node("agent", agent)
graph.add_node("tools", ToolNode(tools))
graph.add_edge(START, "agent")
graph.add_conditional_edges("agent", tools_condition)
graph.add_edge("tools", "agent")
app = graph.compile(checkpointer=KVCheckpointer(SqliteSaver(sqlite3.connect(str(workdir / "graph.sqlite"),
                                                                            check_same_thread=False)), chat))
config = {"configurable": {"thread_id": "expedition"}}
started = app.get_state(config).values.get("messages")
question = HumanMessage("What is the summit altitude in the expedition log?")
state = app.invoke(None if started else {"messages": [question]}, config, durability="sync")  # crash-safe steps
print("answer:", state["messages"][-1].content, flush=True)
"""

with tempfile.TemporaryDirectory() as workdir:
    (Path(workdir) / "log.txt").write_text(("The expedition log. " * 25) + "The summit altitude is 6190 meters. "
                                           + ("Wind notes. " * 60))
    child = subprocess.Popen([sys.executable, "-c", AGENT, workdir], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        print("run 1:", child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)  # mid-run, as a crash would
    child.wait()
    print("run 1 killed; resuming the same thread in a new process")
    resumed = subprocess.run([sys.executable, "-c", AGENT, workdir], capture_output=True, text=True, check=True)
    for line in resumed.stdout.splitlines():
        print("run 2:", line)

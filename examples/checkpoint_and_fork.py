"""Keep a conversation across restarts, and try two continuations of it side by side."""

import tempfile
from pathlib import Path

from hcmemory import HCContext, load_model
from hcmemory.stores import ContextStore

model, tokenizer = load_model()
ctx = HCContext(model, tokenizer, "hc-12.5", context_id="support-ticket-42")
ctx.append("Customer: my order 7731 arrived damaged; the box was crushed and the lamp base cracked.")
print("agent:", ctx.chat("Summarise the customer's problem in one sentence.", max_new_tokens=40))

with tempfile.TemporaryDirectory() as tmp, ContextStore(Path(tmp) / "memory.sqlite") as store:
    store.save(ctx)
    restored = store.load("support-ticket-42", model, tokenizer)  # no re-prefill
    polite, brief = restored.fork(), restored.fork()                 # copy-on-write branches
    print("polite:", polite.chat("Write a polite reply offering a replacement.", max_new_tokens=48))
    print("brief: ", brief.chat("Reply in five words.", max_new_tokens=16))
    print("original context unchanged:", len(restored) == len(ctx))

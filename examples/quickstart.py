"""Load the embedded model, give a context a document once, ask several questions from it."""

from hcmemory import HCContext, load_model
from hcmemory.demo import demo_document

model, tokenizer = load_model()
document, questions = demo_document()
ctx = HCContext(model, tokenizer, "hc-12.5")
ctx.append(document, progress=True)  # prefilled once
for qa in questions[:3]:
    print(qa["question"], "->", ctx.ask(qa["question"], max_new_tokens=32).strip())
stats = ctx.stats()
print(f"{stats.tokens_seen} tokens; next to the model {stats.device_bytes / 2**20:.1f} MB "
      f"({stats.device_ratio:.1%} of a full fp16 cache), host {stats.host_bytes / 2**20:.1f} MB; "
      f"tokens prefilled {stats.tokens_prefilled} (questions add none)")

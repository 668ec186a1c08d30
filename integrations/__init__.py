"""hcmemory behind the frameworks its users build with: ``langchain`` (``HCAttentionLLM``,
``ChatHCAttention``), ``llamaindex`` (``HCQueryEngine``, ``HCAttentionLlamaLLM``) and ``langgraph``
(an agent loop whose KV state is checkpointed per thread).  Each module imports its framework on
import, so ``import hcmemory`` never needs any of them; install the matching extra."""

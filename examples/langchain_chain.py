"""An LCEL chain asking several questions over a long document: the document is prefilled once,
every later question only prefills itself (watch `reused` and the time per question)."""

import time

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from hcmemory.demo import demo_document
from hcmemory.integrations.langchain import HCAttentionLLM

document, questions = demo_document()
llm = HCAttentionLLM(max_tokens=32)  # the embedded SmolLM2, preset hc-12.5; weights load on the first call
prompt = PromptTemplate.from_template("{document}\n\nAnswer from the document above. Question: {question}")
for qa in questions[:4]:
    started = time.perf_counter()
    result = llm.generate([prompt.format(document=document, question=qa["question"])])
    info, text = result.generations[0][0].generation_info, result.generations[0][0].text
    print(f"{time.perf_counter() - started:6.1f} s  reused {info['tokens_reused']:5d}  prefilled "
          f"{info['tokens_prefilled']:5d}  {qa['question']} -> {text.strip()}")
chain = prompt | llm | StrOutputParser()  # the same memory behind a plain LCEL chain
print(chain.invoke({"document": document, "question": questions[4]["question"]}).strip())

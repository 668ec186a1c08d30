"""A folder of text files held as one live memory: several questions, each answered from all of it,
then the memory saved and loaded back without reading the files again."""

import sys
import tempfile
import time
from pathlib import Path

from llama_index.core import SimpleDirectoryReader

from hcmemory.demo import demo_document
from hcmemory.integrations.llamaindex import HCQueryEngine

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else None
with tempfile.TemporaryDirectory() as tmp:
    if folder is None:  # the demo document, split into two files
        document, _ = demo_document()
        folder = Path(tmp) / "docs"
        folder.mkdir()
        half = len(document) // 2
        (folder / "part1.txt").write_text(document[:half])
        (folder / "part2.txt").write_text(document[half:])
    started = time.perf_counter()
    engine = HCQueryEngine.from_documents(SimpleDirectoryReader(str(folder)).load_data(), max_new_tokens=32)
    print(f"read {len(engine.nodes)} nodes, {len(engine.context)} tokens, in {time.perf_counter() - started:.1f} s")
    for question in ("What is the passcode of the document vault in the Bergen office?",
                     "What is the radio call sign of the tug Solvinge?"):
        started = time.perf_counter()
        response = engine.query(question)
        print(f"{time.perf_counter() - started:5.1f} s  prefilled {response.metadata['tokens_prefilled']:3d}  "
              f"{question} -> {str(response).strip()}")
    engine.persist(Path(tmp) / "memory.sqlite", "harbor-docs")
    started = time.perf_counter()
    again = HCQueryEngine.load(Path(tmp) / "memory.sqlite", "harbor-docs", max_new_tokens=32)
    print(f"loaded back in {time.perf_counter() - started:.1f} s: {again.query('Who is the harbor master at Skarvik?')}")

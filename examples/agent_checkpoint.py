"""A LangGraph agent reading a long file page by page, killed in the middle of its run and resumed in
a new process: the resumed steps prefill only the messages added since the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

AGENT = """
import json, sys
from pathlib import Path
from hcmemory.integrations.langgraph import Tools, final_answer, run
workdir = sys.argv[1]
state = run("On which page is the summit altitude, and what is it?", "expedition", workdir,
            Tools(Path(workdir) / "log.txt", page_chars=500), max_steps=5,
            on_step=lambda s: print(json.dumps({k: s[k] for k in ("step", "tokens_reused", "tokens_prefilled")}),
                                    flush=True))
print("answer:", final_answer(state), flush=True)
"""

with tempfile.TemporaryDirectory() as workdir:
    (Path(workdir) / "log.txt").write_text(("The expedition log. " * 60) + "The summit altitude is 6190 meters. "
                                           + ("Wind notes. " * 120))
    child = subprocess.Popen([sys.executable, "-c", AGENT, workdir], stdout=subprocess.PIPE, text=True)
    for _ in range(2):
        print("run 1:", child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)  # mid-run, as a crash would
    child.wait()
    print("run 1 killed; resuming the same thread in a new process")
    resumed = subprocess.run([sys.executable, "-c", AGENT, workdir], capture_output=True, text=True, check=True)
    for line in resumed.stdout.splitlines():
        print("run 2:", line)

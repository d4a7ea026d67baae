"""Puts a benchmark section into docs/benchmarks.md (or another file), between its markers.

    python3 loadtest/write-section.py NAME OUT_FILE SCRIPT < section.md

The section on stdin is wrapped in `<!-- NAME:begin (written by SCRIPT) -->` /
`<!-- NAME:end -->` and replaces the one already there, or is appended. Shared by the loadtest/bench-*.sh scripts
that write their figures into the docs.
"""

import os
import sys

name, out_path, script = sys.argv[1], sys.argv[2], sys.argv[3]
body = sys.stdin.read().strip("\n")
begin, end = f"<!-- {name}:begin", f"<!-- {name}:end -->"
section = f"{begin} (written by {script}) -->\n{body}\n{end}"
text = open(out_path).read() if os.path.exists(out_path) else "# Benchmarks\n"
if begin in text and end in text:
    text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
with open(out_path, "w") as out:
    out.write(text)
print(section)

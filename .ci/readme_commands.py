"""Print the commands of README.md's first ```bash block, one per line, comments stripped (.ci/run checks
that they are the commands it runs)."""
import sys

lines, inside = [], False
for line in open(sys.argv[1], encoding="utf-8"):
    if line.startswith("```"):
        if inside:
            break
        inside = line.strip() == "```bash"
        continue
    if inside:
        cmd = line.split(" #", 1)[0].strip()
        if cmd:
            lines.append(cmd)
if not lines:
    sys.exit("README.md has no ```bash block with commands")
print("\n".join(lines))

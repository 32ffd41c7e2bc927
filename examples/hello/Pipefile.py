"""The smallest useful Pipefile: four tasks, one resource group, three published results.

    pipebuild make            # builds everything into results/
    pipebuild make            # again: nothing runs
    pipebuild make shout      # one task (and what it needs), by name
    pipebuild list            # tasks and targets

Every `{resource}` in a command becomes a short relative path (`in/names.txt`,
`out/ofile`, ...); each command runs in its task's own scratch directory under bash
with `set -euo pipefail`.
"""

from pipebuild import Pipeline

p = Pipeline(name="hello")

names = p.read_input("data/names.txt")
greeting = p.read_input("data/greeting.txt")

# One greeting line per name.
greet = p.new_task(name="greet")
greet.command(f'while read -r name; do echo "$(cat {greeting}), $name!"; done < {names} > {greet.ofile}')

# The same lines, upper case.
shout = p.new_task(name="shout")
shout.command(f"tr '[:lower:]' '[:upper:]' < {greet.ofile} > {shout.ofile}")

# A resource group: three files sharing one root, `{stats}` is the root and
# `{stats.lines}` one member (out/stats.lines).
count = p.new_task(name="count")
count.declare_resource_group(stats={"lines": "{root}.lines", "words": "{root}.words", "chars": "{root}.chars"})
count.command(f"wc -l < {greet.ofile} > {count.stats.lines}")
count.command(f"wc -w < {greet.ofile} > {count.stats.words}")
count.command(f"wc -m < {greet.ofile} > {count.stats.chars}")

# Fan-in: read one task's file and another task's group.
report = p.new_task(name="report")
report.command(
    f"{{ cat {shout.ofile}; echo; "
    f'echo "lines: $(cat {count.stats.lines})"; '
    f'echo "words: $(cat {count.stats.words})"; '
    f'echo "chars: $(cat {count.stats.chars})"; }} > {report.ofile}'
)

p.write_output(shout.ofile, "results/shout.txt")
p.write_output(count.stats, "results/stats")  # results/stats.lines, .words, .chars
p.write_output(report.ofile, "results/report.txt")

if __name__ == "__main__":
    p.run()

"""Parallel branches with fork / join: three tips written at once (their shared prompt is
computed once), then a summary that reads all three.

    loom run examples/parallel_branches.py ["TOPIC"]
"""

from __future__ import annotations

import sys

import loom


@loom.function
def tips(s, topic: str):
    s += loom.system("You give short, practical advice.")
    s += loom.user(f"Give one tip about {topic}.")
    with s.assistant():
        forks = s.fork(3)
        for i, angle in enumerate(["sleep", "food", "exercise"]):
            forks[i] += f"A tip about {angle}: " + loom.gen("tip", max_tokens=24, stop="\n")
        forks.join()  # s["tip"] is now the list of the three branches' tips
        s += "Three tips:\n" + "".join(f"- {t.strip()}\n" for t in s["tip"])
    s += loom.user("Which tip matters most? One sentence.")
    s += loom.assistant(loom.gen("best", max_tokens=32))


def main(topic: str) -> None:
    loom.set_default_backend(loom.Engine())
    state = tips.run(topic=topic, temperature=0)
    for i, tip in enumerate(state["tip"]):
        print(f"tip {i + 1}: {tip.strip()}")
    print("most important:", state["best"].strip())
    print("cached tokens per branch:", [m["cached_tokens"] for m in state.get_meta_info("tip")])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "staying healthy")

"""Multi-turn chat, streamed: each turn's answer prints as it is generated; the history is
rendered with the model's own chat template and stays in the prefix cache.

    loom run examples/multi_turn_chat.py
"""

from __future__ import annotations

import loom

QUESTIONS = ["What is the capital of France?", "What is it famous for?", "Name one museum there."]


@loom.function
def chat(s, questions: list[str]):
    s += loom.system("You are a helpful assistant. Keep answers short.")
    for i, question in enumerate(questions):
        s += loom.user(question)
        s += loom.assistant(loom.gen(f"answer{i}", max_tokens=48))


def main() -> None:
    loom.set_default_backend(loom.Engine())
    state = chat.run(questions=QUESTIONS, temperature=0, stream=True)
    for i, question in enumerate(QUESTIONS):
        print(f"user: {question}\nassistant: ", end="", flush=True)
        for piece in state.text_iter(f"answer{i}"):
            print(piece, end="", flush=True)
        meta = state.get_meta_info(f"answer{i}")
        print(
            f"\n  ({meta['completion_tokens']} tokens, {meta['cached_tokens']} prompt tokens cached)"
        )
    print(f"\n{len(state.messages())} messages")


if __name__ == "__main__":
    main()

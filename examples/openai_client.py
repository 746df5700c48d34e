"""A client of `loom serve` with the `openai` package: plain chat completions, a JSON-schema
response, and a loom program running on the server through `loom.OpenAI`.

    loom run examples/openai_client.py [URL]     (default: start a server on the default model)
"""

from __future__ import annotations

import json
import sys

import openai

import loom


@loom.function
def haiku(s, subject: str):
    s += loom.user(f"Write a haiku about {subject}.")
    s += loom.assistant(loom.gen("poem", max_tokens=40))
    s += loom.user("Give it a title of at most four words.")
    s += loom.assistant(loom.gen("title", max_tokens=10, stop="\n"))


def demo(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in French."}],
        max_tokens=16,
        temperature=0,
    )
    print("chat:", reply.choices[0].message.content)

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    }
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Which city is the capital of Italy? JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        max_tokens=32,
        temperature=0,
    )
    print("json:", json.loads(reply.choices[0].message.content))

    state = haiku.run(
        subject="autumn rain", backend=loom.OpenAI(base_url=url + "/v1"), temperature=0
    )
    print(f"program: {state['title'].strip()!r}\n{state['poem'].strip()}")


def main() -> None:
    if len(sys.argv) > 1:
        demo(sys.argv[1].rstrip("/"))
        return
    with loom.Runtime() as runtime:
        demo(runtime.url)


if __name__ == "__main__":
    main()

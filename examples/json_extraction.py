"""Extract a JSON record from every text file in a folder with one `run_batch`.

    loom run examples/json_extraction.py [FOLDER]      (default: examples/data/people)

Each gen is constrained by a JSON schema (here from a pydantic model), so every output
parses and validates; the instructions every program shares are computed once.
"""

from __future__ import annotations

import json
import pathlib
import sys

from pydantic import BaseModel, Field

import loom


class Person(BaseModel):
    name: str = Field(max_length=40)
    birth_year: int = Field(ge=1000, le=2100)
    birth_city: str = Field(max_length=40)
    occupation: str = Field(max_length=40)


@loom.function
def extract(s, document: str):
    s += loom.system("You extract facts from documents and answer with JSON only.")
    s += loom.user(
        "Extract the person's name, birth year, birth city and occupation.\n\n" + document
    )
    s += loom.assistant(loom.gen("record", json_schema=Person, max_tokens=96, temperature=0))


def main(folder: str) -> None:
    files = sorted(pathlib.Path(folder).glob("*.txt"))
    loom.set_default_backend(loom.Engine())
    states = extract.run_batch([{"document": f.read_text()} for f in files], progress_bar=True)
    for path, state in zip(files, states):
        if state.error():
            print(f"{path.name}: failed: {state.error()}")
            continue
        person = Person.model_validate(json.loads(state["record"]))
        meta = state.get_meta_info("record")
        print(
            f"{path.name}: {person.model_dump()}  (cached prompt tokens: {meta['cached_tokens']})"
        )


if __name__ == "__main__":
    default = pathlib.Path(__file__).parent / "data" / "people"
    main(sys.argv[1] if len(sys.argv) > 1 else str(default))

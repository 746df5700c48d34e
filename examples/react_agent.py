"""A ReAct-style agent: `select` picks the next action, Python runs the tool, the observation
goes back into the prompt, until the agent chooses to answer.

    loom run examples/react_agent.py ["QUESTION"]
"""

from __future__ import annotations

import ast
import operator
import sys

import loom

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}
POPULATION = {"france": "68 million", "japan": "124 million", "italy": "59 million"}


def calculator(expression: str) -> str:
    """Arithmetic only: + - * / ** on numbers."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {expression!r}")

    try:
        return str(ev(ast.parse(expression.strip(), mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError) as e:
        return f"error: {e}"


def population(country: str) -> str:
    return POPULATION.get(country.strip().lower(), "unknown")


TOOLS = {"calculator": calculator, "population": population}


EXAMPLE = """Example:
Question: What is 6 times 7?
Action: calculator
Input: 6*7
Observation: 42
Action: answer
Answer: 6 times 7 is 42."""


@loom.function
def agent(s, question: str, max_steps: int = 3):
    s += loom.system(
        "Answer the question. Tools: calculator (arithmetic like 12*7) and population "
        "(a country's population). Use a tool when it helps, then answer.\n" + EXAMPLE
    )
    s += loom.user("Question: " + question)
    for step in range(max_steps):
        with s.assistant():
            s += "Action: " + loom.select(f"action{step}", ["calculator", "population", "answer"])
            action = s[f"action{step}"]  # Python control flow on the model's choice
            if action == "answer":
                s += "\nAnswer: " + loom.gen("answer", max_tokens=32, stop="\n")
                return
            s += "\nInput: "
            if action == "calculator":
                s += loom.gen(f"input{step}", regex=r"[0-9]{1,6} ?[-+*/] ?[0-9]{1,6}")
            else:
                s += loom.select(f"input{step}", [c.title() for c in POPULATION])
        observation = TOOLS[action](s[f"input{step}"])
        s += loom.user(f"Observation: {observation}")
    s += loom.assistant("Answer: " + loom.gen("answer", max_tokens=32, stop="\n"))


def main(question: str) -> None:
    loom.set_default_backend(loom.Engine())
    state = agent.run(question=question, temperature=0)
    for message in state.messages():
        print(f"[{message['role']}] {message['content']}")
    print("\nfinal answer:", state["answer"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "What is 37 times 12?")

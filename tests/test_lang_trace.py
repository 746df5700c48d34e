"""The tracer and request graphs: nodes, edges, constant prefixes, where a trace stops."""

from __future__ import annotations

import loom
from loom.lang.chat_template import PLAIN
from loom.lang.executor import RunContext
from loom.lang.interpreter import execute
from loom.lang.program import render_constant
from tests.lang_fakes import FakeBackend


@loom.function
def few_shot(s, question):
    s += loom.system("You answer in one word.")
    s += "Q: 2+2?\nA: 4\n"
    s += loom.user("Q: " + question)
    s += loom.assistant(loom.gen("answer", stop="\n"))
    s += loom.user("Sure? " + s["answer"])
    s += loom.assistant(loom.select("sure", ["yes", "no"]))


def test_graph_has_a_node_per_expression_in_order():
    graph = few_shot.trace()
    assert graph.kinds() == [
        "role_begin",
        "text",
        "role_end",
        "text",
        "role_begin",
        "text",
        "arg",
        "role_end",
        "role_begin",
        "gen",
        "role_end",
        "role_begin",
        "text",
        "var_read",
        "role_end",
        "role_begin",
        "select",
        "role_end",
    ]
    assert graph.stop_reason is None
    assert [n.label for n in graph.find("gen")] == ["answer"]
    assert [n.label for n in graph.find("arg")] == ["question"]


def test_prefix_edges_chain_the_text_and_variable_edges_link_reads():
    graph = few_shot.trace()
    assert graph.prefix_edges == [(i, i + 1) for i in range(len(graph.nodes) - 1)]
    gen = graph.find("gen", "answer")[0]
    read = graph.find("var_read", "answer")[0]
    assert graph.var_edges == [(gen.id, read.id)]


def test_constant_prefix_stops_at_the_first_argument():
    graph = few_shot.trace()
    ctx = RunContext(FakeBackend(), PLAIN, run=execute)
    assert render_constant(ctx, graph.constant_prefix()) == (
        "System: You answer in one word.\n\nQ: 2+2?\nA: 4\nUser: Q: "
    )


def test_concrete_arguments_extend_the_constant_prefix():
    graph = few_shot.trace(question="3+3?")
    ctx = RunContext(FakeBackend(), PLAIN, run=execute)
    assert render_constant(ctx, graph.constant_prefix()).endswith("User: Q: 3+3?\nAssistant: ")
    assert graph.find("arg") == []


def test_fstring_on_an_argument_stops_the_trace_with_the_reason():
    @loom.function
    def prog(s, topic):
        s += "Intro. "
        s += f"Write about {topic}."
        s += loom.gen("essay")

    graph = prog.trace()
    assert graph.kinds() == ["text"]
    assert "argument 'topic'" in graph.stop_reason and "f-string" in graph.stop_reason
    assert "test_lang_trace.py" in graph.stop_reason


def test_python_branch_on_a_generated_value_stops_the_trace():
    @loom.function
    def prog(s):
        s += loom.select("go", ["yes", "no"])
        if s["go"] == "yes":
            s += loom.gen("more")

    graph = prog.trace()
    assert graph.kinds() == ["select"]
    assert "generated value 'go'" in graph.stop_reason


def test_fork_and_join_nodes_with_branches():
    @loom.function
    def prog(s):
        s += "Ideas:"
        forks = s.fork(2)
        forks += lambda i: loom.gen("idea", max_tokens=8)
        forks.join()
        s += "Best: " + loom.gen("best")

    graph = prog.trace()
    fork = graph.find("fork")[0]
    gens = graph.find("gen", "idea")
    join = graph.find("join")[0]
    assert [g.branch for g in gens] == [1, 2]
    assert all(graph.predecessors(g.id) == [fork.id] for g in gens)
    assert sorted(graph.predecessors(join.id)) == sorted([fork.id, *(g.id for g in gens)])
    assert graph.definitions["idea"] == join.id
    assert graph.nodes[-1].kind == "gen" and graph.nodes[-1].branch == 0


def test_nested_programs_are_inlined_into_the_graph():
    @loom.function
    def inner(s, label):
        s += label + ": " + loom.gen(label)

    @loom.function
    def outer(s):
        s += "Start. "
        inner(s, "x")
        inner(s, "y")

    graph = outer.trace()
    assert [n.label for n in graph.find("gen")] == ["x", "y"]


def test_graph_prints_its_nodes_and_edges():
    text = str(few_shot.trace())
    assert text.startswith("RequestGraph(few_shot): 18 nodes")
    assert "gen 'answer'" in text and "uses #9" in text


def test_reading_an_untraced_variable_stops_the_trace():
    @loom.function
    def prog(s):
        s += s["missing"]

    assert "reads variable 'missing'" in prog.trace().stop_reason


def test_cache_sends_the_constant_prefix():
    backend = FakeBackend()
    prefix = few_shot.cache(backend=backend)
    assert backend.cached == [prefix] and prefix.startswith("System: You answer")

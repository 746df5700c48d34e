"""The embedded SmolLM2-135M-Instruct: loom's greedy tokens equal transformers' on the same
converted weights, and `loom generate` runs it end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom.runtime.engine import Engine
from tests.tiny_models import hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three primary colors are",
]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with Engine(device="cpu", dtype="float32", max_total_tokens=16384) as e:
        yield e


def test_default_model_greedy_matches_transformers(engine, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    prompts = [tokenizer(p).input_ids for p in PROMPTS] + [list(chat)]
    outs = engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
    )
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == hf_greedy(hf, prompt, 24), tokenizer.decode(prompt)
    assert "Paris" in outs[0]["text"]


def test_loom_generate_cli_streams_an_answer(default_model_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom.cli",
            "generate",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
            "--max-total-tokens",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "finish:" in proc.stderr

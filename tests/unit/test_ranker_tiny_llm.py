"""The tiny LLM fixture other suites rely on: loadable, letters are single tokens, LoRA is live."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.testing.tiny_llm import LETTERS


def test_tiny_llm_letters_are_single_tokens(tiny_llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    for letter in LETTERS:
        assert len(tokenizer.encode(letter, add_special_tokens=False)) == 1
        assert len(tokenizer.encode(" " + letter, add_special_tokens=False)) == 1
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template


def test_tiny_lora_changes_logits(tiny_llm_dir, tiny_lora_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tiny_lora_dir).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)

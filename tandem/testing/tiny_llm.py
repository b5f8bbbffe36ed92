"""A tiny randomly initialised Llama + BPE tokenizer (and LoRA adapters) for fast ranker tests.

The checkpoint is saved with ``save_pretrained`` (safetensors, ``tokenizer.json``, ChatML chat
template), so transformers, peft and vLLM all load it like a real model. Everything is seeded:
the same call builds byte-identical weights and the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

LETTERS = tuple(chr(ord("A") + i) for i in range(20))
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
# ChatML, as SmolLM2-Instruct uses it (without its default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEMPLATE_WORDS = (
    "You are a movie recommender system. Given the user's watching history, select the movie "
    "the user is most likely to watch next from the candidates. Answer with the index letter "
    "of the candidate only. The user has watched the following movies in order: "
    "Candidates: Answer: Preference: user profile embedding item : caption title book product "
    "music song game store shop list choose pick best fits likely next watch read listen buy "
    "system user assistant ### Instruction Input Response"
)
_TITLES = (
    "Toy Story",
    "GoldenEye",
    "Four Rooms",
    "Get Shorty",
    "Copycat",
    "Twelve Monkeys",
    "Babe",
    "Dead Man Walking",
    "Richard III",
    "Seven",
    "The Usual Suspects",
    "Mighty Aphrodite",
    "Postino",
    "Mr. Holland's Opus",
    "French Twist",
    "From Dusk Till Dawn",
    "White Balloon",
    "Antonia's Line",
    "Angels and Insects",
    "Muppet Treasure Island",
    "Braveheart",
    "Taxi Driver",
    "Rumble in the Bronx",
    "Birdcage",
    "Brothers McMullen",
    "Bad Boys",
    "Apollo 13",
    "Batman Forever",
    "Belle de jour",
    "Crimson Tide",
    "Crumb",
    "Desperado",
    "Doom Generation",
    "Free Willy 2",
    "Mad Love",
    "Nadja",
    "Net",
    "Strange Days",
    "To Wong Foo",
    "Billy Madison",
    "Clerks",
    "Disclosure",
    "Dolores Claiborne",
    "Eat Drink Man Woman",
    "Exotica",
    "Ed Wood",
    "Hoop Dreams",
    "Heavenly Creatures",
    "Hideaway",
    "Star Wars",
    "Legends of the Fall",
    "Madness of King George",
    "Natural Born Killers",
    "Outbreak",
    "Professional",
    "Pulp Fiction",
    "Priest",
    "Quiz Show",
    "Three Colors: Red",
    "Shawshank Redemption",
    "Tales from the Crypt",
    "Item",
    "Drama",
    "Comedy",
    "Action",
    "Thriller",
    "Romance",
    "Sci-Fi",
    "Horror",
    "Animation",
)


def _corpus() -> list[str]:
    """Template words, titles with numbers, and letter lists (so " A".." T" become merges)."""
    lines = [_TEMPLATE_WORDS] * 20 + [f"{t} ({1990 + n % 10})" for n, t in enumerate(_TITLES)]
    lines += [f"Item {n}" for n in range(200)]
    lines += [" ".join(f"{x}. {x}" for x in LETTERS)] * 200
    lines += [" ".join(f"{x}:" for x in LETTERS)] * 50
    return lines


def make_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer in which "A".."T" and " A".." T" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    for letter in LETTERS:
        for form in (letter, " " + letter):
            ids = fast.encode(form, add_special_tokens=False)
            if len(ids) != 1:
                raise RuntimeError(f"tiny tokenizer splits {form!r} into {ids}: retune the corpus")
    return fast


def make_tiny_llm(
    path: Path, seed: int = 0, hidden_size: int = 128, num_layers: int = 2, chatty: bool = False
) -> Path:
    """Save a seeded random Llama (hidden 128, 2 layers, 4 heads) and its tokenizer to ``path``.

    ``chatty``: an untied LM head with large random weights. With tied embeddings a random
    model copies its last input token (a newline after the chat template) forever; an untied
    head gives varied text, so generated summaries actually evolve.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=not chatty,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if chatty:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 1.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_lora(base: Path, path: Path, seed: int = 0, rank: int = 8) -> Path:
    """Save a peft LoRA adapter (q/k/v, rank 8) with non-zero B weights, so it changes scores."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=4 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path

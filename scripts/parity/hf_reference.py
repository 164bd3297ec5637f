#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for the tiny generated Qwen models.

Writes one JSON fixture per architecture with, for fixed inputs: the token ids the HF
tokenizer produces, the full-sequence f32 logits, the greedy continuation from
`model.generate`, and the ids of a chat prompt rendered by the model's chat template.
The Rust test `tests/tests/parity.rs` compares the engine against these files.

Regenerate (needs torch and transformers; see docs/PARITY.md):

    cargo build -p council-runtime
    python3 scripts/parity/hf_reference.py --council target/debug/council \
        --out tests/fixtures/parity
"""

import argparse
import json
import pathlib
import subprocess
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The council met at dawn and read the task.",
    "What is 7 + 5 * 3 - 2? Think, then answer with one integer: 20.",
]
CHAT = [
    {"role": "system", "content": "You are a careful QA reviewer."},
    {"role": "user", "content": "Review this proposal: add a bounded queue."},
]
GREEDY_NEW_TOKENS = 16
SEED = 0


def reference(council: str, arch: str, workdir: pathlib.Path) -> dict:
    model_dir = workdir / arch
    subprocess.run(
        [council, "dev", "tiny-model", str(model_dir), "--arch", arch, "--seed", str(SEED)],
        check=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    # Every weight must come from the file: a re-initialised tensor would make parity meaningless.
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"{arch}: transformers did not load the model cleanly: {problems}")
    model.eval()
    cases = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids).logits[0]
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=GREEDY_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids):]
        cases.append(
            {
                "text": text,
                "input_ids": ids,
                "logits": [[round(float(v), 6) for v in row] for row in logits],
                "greedy_ids": generated.tolist(),
            }
        )
    chat_ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, enable_thinking=False, tokenize=True
    )
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    return {
        "generator": {"arch": arch, "seed": SEED, "shape": "tiny"},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "cases": cases,
        "chat": {"messages": CHAT, "ids": list(chat_ids)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--council", required=True, help="path to the council binary")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="fixture directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ["qwen2", "qwen3"]:
            fixture = reference(args.council, arch, pathlib.Path(tmp))
            path = args.out / f"{arch}.json"
            path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch + transformers (eager) baseline for `council dev bench`.

Loads the same safetensors directory the engine loads (e.g. one written by
`council dev tiny-model DIR --shape small`), in f32 with eager attention, and measures what
`council dev bench` measures with the same arguments:

- prefill: one request of --prompt-tokens tokens, time to its first token;
- decode at each --batch size: --batch requests of --prompt-tokens tokens each decode
  --new-tokens tokens greedily with the KV cache; decode tok/s counts the tokens after each
  request's first, over the time after the first tokens.

Prompts are the same token ids `council dev bench` uses. Threads default to the machine's
cores (torch.set_num_threads), as the engine uses them. On a GPU (`--device cuda`, with
`--dtype bf16` as the engine runs there) every timing waits for the device to finish.

    python3 scripts/bench/torch_decode.py --model-dir target/small-qwen2 \
        --prompt-tokens 128 --new-tokens 32 --batch 1,8
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def bench_prompt(n, salt):
    """The ids `council dev bench` builds: (i * 7 + salt * 13) % 200 + 32."""
    return [(i * 7 + salt * 13) % 200 + 32 for i in range(n)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode(model, prompts, new_tokens, device="cpu"):
    """Greedy decode of equal-length prompts; returns (time to first tokens, decode seconds)."""
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        sync(device)
        first = time.perf_counter() - start
        decode_start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        sync(device)
    return first, time.perf_counter() - decode_start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, attn_implementation="eager"
    ).to(args.device)
    model.eval()
    batches = [int(b) for b in args.batch.split(",")]
    # Warm-up, as the engine bench does.
    decode(model, [bench_prompt(args.prompt_tokens, s) for s in range(max(batches))], 2,
           args.device)
    results = {
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    first, _ = decode(model, [bench_prompt(args.prompt_tokens, 1)], 1, args.device)
    results["prefill_tok_s"] = args.prompt_tokens / first
    results["ttft_s"] = first
    print(f"prefill: {args.prompt_tokens} tokens in {first:.3f}s -> "
          f"{args.prompt_tokens / first:.1f} tok/s")
    for batch in batches:
        prompts = [bench_prompt(args.prompt_tokens, s + 2) for s in range(batch)]
        _, seconds = decode(model, prompts, args.new_tokens, args.device)
        tokens = batch * (args.new_tokens - 1)
        results[f"decode_batch_{batch}_tok_s"] = tokens / seconds
        print(f"decode batch {batch}: {tokens} tokens in {seconds:.3f}s -> "
              f"{tokens / seconds:.1f} tok/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Concurrent load on a llama-server, measured as `council dev bench` measures the engine.

Waits for /health, warms up, then:
- TTFT: one request of --prompt-tokens tokens generating one token (the server's prompt_ms);
- N concurrent requests (--concurrency) of --prompt-tokens token ids each, --new-tokens tokens
  each, greedy, EOS ignored: aggregate decode tok/s (tokens after each request's first, over
  the time from the last first token to the last completion, from the server's own timings)
  and end-to-end tok/s (all generated tokens over the client's wall time);
- the server's peak RSS (VmHWM of --pid).

Prompts are the ids `council dev bench` uses: (i*7 + salt*13) % 200 + 32, a salt per request.
"""

import argparse
import json
import threading
import time
import urllib.request


def prompt(n, salt):
    return [(i * 7 + salt * 13) % 200 + 32 for i in range(n)]


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def complete(url, tokens, n_predict):
    return post(
        url + "/completion",
        {
            "prompt": tokens,
            "n_predict": n_predict,
            "temperature": 0.0,
            "ignore_eos": True,
            "cache_prompt": False,
        },
    )


def wait_healthy(url, deadline_s=120):
    start = time.time()
    while time.time() - start < deadline_s:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llama-server at {url} not healthy after {deadline_s} s")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    wait_healthy(a.url)
    # Warm-up: as many requests as slots, two tokens each.
    threads = [
        threading.Thread(target=complete, args=(a.url, prompt(a.prompt_tokens, 1000 + s), 2))
        for s in range(a.concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    first = complete(a.url, prompt(a.prompt_tokens, 1), 1)["timings"]
    print(
        f"prefill: {a.prompt_tokens} tokens in {first['prompt_ms'] / 1000:.3f}s -> "
        f"{first['prompt_per_second']:.1f} tok/s; time to first token "
        f"{first['prompt_ms'] / 1000:.3f}s"
    )

    results = [None] * a.concurrency
    submitted = [0.0] * a.concurrency

    def one(i):
        submitted[i] = time.time()
        results[i] = (complete(a.url, prompt(a.prompt_tokens, i + 2), a.new_tokens), time.time())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(a.concurrency)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    generated = sum(r["timings"]["predicted_n"] for r, _ in results)
    if any(r["timings"]["predicted_n"] != a.new_tokens for r, _ in results):
        raise SystemExit("a request stopped early")
    # Decode span as council measures it: from the last first token to the last completion.
    # A request's first token comes prompt_ms after it started; its end is when it returned.
    last_first = max(
        submitted[i] + r["timings"]["prompt_ms"] / 1000 for i, (r, _) in enumerate(results)
    )
    last_end = max(end for _, end in results)
    decode_tokens = generated - a.concurrency
    decode_s = last_end - last_first
    print(
        f"decode batch {a.concurrency}: {decode_tokens} tokens in {decode_s:.3f}s -> "
        f"{decode_tokens / decode_s:.1f} tok/s; end to end {generated} tokens in {wall:.3f}s "
        f"-> {generated / wall:.1f} tok/s"
    )
    print(f"peak RSS: {peak_rss_mib(a.pid):.0f} MiB")


if __name__ == "__main__":
    main()

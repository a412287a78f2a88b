"""Offline generation: strings in, text out, with ``LLM`` and ``SamplingParams``.

Three ways to pick tokens on the embedded default model (a small random-weight Llama, so the
text is gibberish but every token is computed for real):

* greedy (``temperature=0``): the argmax at every step, the same on every run;
* seeded sampling (temperature + top-p + ``seed``): random, yet reproducible run to run and
  independent of which other prompts share the batch;
* ``n > 1``: several samples of one prompt that share the prompt's KV blocks; with a seed each
  sibling draws its own stream, so the samples differ from each other but not between runs.

Runs on the CPU (``python examples/offline_generation.py``) in a few seconds.
"""

from __future__ import annotations

from layerzero_serve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "A paged KV cache stores", "Once upon a time"]
MAX_TOKENS = 12


def generate_tokens(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    """Token ids per prompt, per sample: ``[len(PROMPTS)][params.n][<= max_tokens]``."""
    results = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[c.token_ids for c in r.outputs] for r in results]


def main() -> dict:
    llm = LLM(device="cpu")  # the default model, written once under LZ_CACHE_DIR

    # ignore_eos: a random model may emit EOS at any step; we want exactly MAX_TOKENS tokens.
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    results = llm.generate(PROMPTS, greedy, use_tqdm=False)
    print("greedy:")
    for r in results:
        print(f"  {r.prompt!r} -> {r.text!r} ({len(r.token_ids)} tokens, {r.finish_reason})")

    seeded = SamplingParams(
        temperature=0.8, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True
    )
    first, second = generate_tokens(llm, seeded), generate_tokens(llm, seeded)
    print("seeded sampling, two runs identical:", first == second)

    # The seed is per request: the same prompt alone in its batch samples the same tokens.
    alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].token_ids
    print("same seed, prompt alone in the batch, identical:", alone == first[1][0])

    several = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    samples = llm.generate(PROMPTS[0], several, use_tqdm=False)[0]
    print(f"n=3 samples of {PROMPTS[0]!r}:")
    for c in samples.outputs:
        print(f"  {c.text!r}")
    samples_again = generate_tokens(llm, several)[0]

    return {
        "model_dir": str(llm.engine.model_dir),
        "prompts": PROMPTS,
        "prompt_token_ids": [r.prompt_token_ids for r in results],
        "greedy_tokens": [r.token_ids for r in results],
        "greedy_text": [r.text for r in results],
        "seeded_run_1": first,
        "seeded_run_2": second,
        "seeded_alone": alone,
        "n_samples": [c.token_ids for c in samples.outputs],
        "n_samples_again": samples_again,
    }


if __name__ == "__main__":
    main()

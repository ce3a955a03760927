"""TransformerLens's `utils.test_prompt`: how a model ranks an answer after a prompt, printed
(`jpatch.utils.test_prompt`; printing is the face's job)."""

import jax
import jax.numpy as jnp
import numpy as np


def test_prompt(prompt, answer, model, prepend_space_to_answer=True, print_details=True, prepend_bos=None,
                top_k=10):
    """Print how the model ranks `answer` after `prompt` (rank, logit, probability of each answer
    token, and the top_k tokens), as TransformerLens's `utils.test_prompt`. A list of answers compares
    their first tokens. prepend_bos None: True (the to_tokens default). Returns None."""
    prepend_bos = True if prepend_bos is None else prepend_bos
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers:
        raise ValueError("test_prompt needs an answer")
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    several = len(answers) > 1
    prompt_ids = np.asarray(model.to_tokens(prompt, prepend_bos=prepend_bos))[0]
    answer_ids = [np.asarray(model.to_tokens(a, prepend_bos=False))[0] for a in answers]
    if several:
        answer_ids = [a[:1] for a in answer_ids]
    tokens = np.stack([np.concatenate([prompt_ids, a]) for a in answer_ids])
    prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_strs = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    n_prompt, n_answer = len(prompt_ids), len(answer_ids[0])
    if print_details:
        print("Tokenized prompt:", prompt_str)
        print("Tokenized answers:" if several else "Tokenized answer:", answer_strs if several else answer_strs[0])
    logits = np.asarray(model(jnp.asarray(tokens)), np.float32)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    ranks = []
    for index in range(n_prompt, n_prompt + n_answer):
        want = tokens[:, index]
        p = probs[:, index - 1]
        order = np.argsort(-p, axis=-1, kind="stable")
        rank = [int(np.flatnonzero(order[i] == want[i])[0]) for i in range(len(answers))]
        strs = [a[index - n_prompt] for a in answer_strs]
        ranks.append(list(zip(strs, rank)))
        if print_details:
            print(f"Performance on answer token{'s' if several else ''}:")
            for i in range(len(answers)):
                print(f"Rank: {rank[i]: <8} Logit: {logits[i, index - 1, want[i]]:5.2f} Prob: "
                      f"{p[i, want[i]]:6.2%} Token: |{strs[i]}|")
            for i in range(top_k):
                t = order[0, i]
                print(f"Top {i}th token. Logit: {logits[0, index - 1, t]:5.2f} Prob: {p[0, t]:6.2%} "
                      f"Token: |{model.to_string(t)}|")
    print("Ranks of the answer tokens:", [r[0] for r in ranks] if not several else ranks)


test_prompt.__test__ = False  # not a pytest test
